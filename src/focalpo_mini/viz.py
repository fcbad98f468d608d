"""Plots and widgets for the book: one colour-blind-safe style and the gamma explorer.

Colours are the Okabe-Ito palette (Okabe and Ito, 2008), distinguishable under the common forms of
colour blindness. Each loss keeps one colour throughout the book (``LOSS_COLORS``).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence

import ipywidgets as widgets
import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch
from cycler import cycler
from IPython.display import display
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from focalpo_mini._checks import check_float_tensor, check_int, check_number
from focalpo_mini.losses import focal_loss, gradient_weight

# Okabe-Ito palette.
BLACK = "#000000"
ORANGE = "#E69F00"
SKY_BLUE = "#56B4E9"
BLUISH_GREEN = "#009E73"
YELLOW = "#F0E442"
BLUE = "#0072B2"
VERMILLION = "#D55E00"
REDDISH_PURPLE = "#CC79A7"
GREY = "#999999"

OKABE_ITO = (ORANGE, SKY_BLUE, BLUISH_GREEN, YELLOW, BLUE, VERMILLION, REDDISH_PURPLE, BLACK)
"""The eight Okabe-Ito colours, in the order matplotlib cycles through them after apply_style()."""

LOSS_COLORS = {
    "dpo": BLACK,
    "focalpo": BLUE,
    "focalpo_detached": BLUISH_GREEN,
    "focal": VERMILLION,
}
"""One colour per loss, used by every figure in the book."""


def apply_style() -> None:
    """Set matplotlib's defaults for the book: Okabe-Ito colours, light grid, readable sizes."""
    mpl.rcParams.update(
        {
            "axes.prop_cycle": cycler(color=list(OKABE_ITO)),
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "legend.frameon": False,
            "figure.dpi": 100,
        }
    )


MAX_INCHES = 50.0
"""The largest figure side the helpers accept: larger figures take gigabytes to draw."""


def new_figure(
    ncols: int = 1, *, width: float = 6.4, height: float = 3.6
) -> tuple[Figure, Axes | list[Axes]]:
    """A figure in the book's style with ``ncols`` axes side by side.

    Args:
        ncols: number of axes, ``>= 1``.
        width, height: figure size in inches (the defaults fit the book's text width).

    Returns:
        ``(figure, axes)``: one ``Axes`` when ``ncols == 1``, else a list of them.

    Raises:
        ValueError: if ``ncols < 1`` or a size is not positive.
    """
    ncols = check_int("ncols", ncols, 1, maximum=100)
    width = check_number("width", width, minimum=0.0, inclusive=False, maximum=MAX_INCHES)
    height = check_number("height", height, minimum=0.0, inclusive=False, maximum=MAX_INCHES)
    apply_style()
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), layout="constrained")
    return fig, (axes if ncols == 1 else list(axes))


# --- The gamma explorer: gradient weight against the reward margin, on measured margins ---------

EXPLORER_GAMMAS = tuple(0.25 * k for k in range(13))
"""The gamma grid of the static explorer's frames: 0 to 3 in steps of 0.25, fine enough that one
notch moves the sign flip and the shares a little, and wide enough to pass 1/ln 2, where the
in-graph weight at p = 1/2 turns negative."""

WEIGHT_LABELS = {
    "dpo": r"DPO, $w = 1-p$",
    "focalpo": r"FocalPO, $p^\gamma$ in the graph",
    "focalpo_detached": r"FocalPO, $p^\gamma$ detached",
    "focal": r"focal direction, $(1-p)^\gamma$",
}
"""Legend label of each gradient-weight curve, keyed like ``LOSS_COLORS``."""

SHORT_LABELS = {
    "dpo": "DPO",
    "focalpo": "FocalPO, in graph",
    "focalpo_detached": "FocalPO, detached",
    "focal": "focal direction",
}
"""A few words for each loss, keyed like ``LOSS_COLORS``: bar legends and alt text."""

P_TICKS = (0.01, 0.1, 0.5, 0.9, 0.99)
"""Where the explorer's top axis marks p = sigmoid(z)."""

_WEIGHT_YLIM = (-0.2, 1.35)  # holds every curve for gamma in [0, 5], so frames share one scale
_ZERO_MARGIN = 1e-6  # |z| below this counts as "not moved yet" in the alt text


def loss_weights(
    z: torch.Tensor, *, gamma: float, detach: bool | None = None
) -> dict[str, torch.Tensor]:
    """The gradient weight w(z) (dL/dz = -w) of each loss the explorer compares.

    Keys: ``"dpo"``; ``"focalpo"`` (factor in the graph) unless ``detach`` is True;
    ``"focalpo_detached"`` unless ``detach`` is False; ``"focal"``, focal loss's factor
    (1 - p)**gamma on the DPO loss, whose weight comes from autograd through
    :func:`focalpo_mini.losses.focal_loss` (target 1, no alpha).

    Args:
        z: reward margins (preference logits), shape ``(N,)``, floating point.
        gamma: exponent of the modulating factor, ``>= 0``.
        detach: None for both FocalPO forms, True for the detached one only, False for the
            in-graph one only.

    Returns:
        A dict of weights, each of shape ``(N,)`` and dtype ``z.dtype``, in the order above.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    if not (detach is None or isinstance(detach, bool)):
        raise TypeError(f"detach must be None, True or False, got {_describe(detach)}")
    weights = {"dpo": gradient_weight(z, gamma=0.0)}
    if detach is not True:
        weights["focalpo"] = gradient_weight(z, gamma=gamma)
    if detach is not False:
        weights["focalpo_detached"] = gradient_weight(z, gamma=gamma, detach_weight=True)
    weights["focal"] = _focal_direction_weight(z, gamma=gamma)
    return weights


def weight_share(weight: torch.Tensor, group: torch.Tensor) -> float:
    """Share of the total absolute gradient weight, sum_i |w_i|, that falls on the pairs in
    ``group``. Absolute values, because the in-graph FocalPO weight is negative for
    p < e^(-1/gamma): a pair pushed the wrong way still takes its part of the update.

    Args:
        weight: shape ``(N,)``, the gradient weight of each pair.
        group: bool, shape ``(N,)``: the pairs whose share to return.

    Returns:
        A float in [0, 1].

    Raises:
        TypeError, ValueError: for a bad argument (or a weight that is 0 for every pair); the
            message names it.
    """
    check_float_tensor("weight", weight, ndim=1)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must be finite, found NaN or inf")
    if not isinstance(group, torch.Tensor) or group.dtype != torch.bool:
        raise TypeError(f"group must be a bool tensor, got {_describe(group)}")
    if group.shape != weight.shape:
        raise ValueError(
            f"group has shape {tuple(group.shape)}, expected {tuple(weight.shape)} like weight"
        )
    total = weight.abs().sum()
    if not total > 0:
        raise ValueError("weight is 0 for every pair: no share to divide")
    return (weight.abs()[group].sum() / total).item()


def sign_flip_margin(*, gamma: float, beta: float = 1.0) -> float | None:
    """Where the in-graph FocalPO gradient turns negative, p = exp(-1/gamma), as a margin.

    With ``beta=1`` it is the reward margin z = logit(exp(-1/gamma)); with the run's beta, the
    log-ratio difference h = z / beta. None for gamma = 0 (DPO never flips).

    Raises:
        TypeError, ValueError: if ``gamma < 0`` or ``beta <= 0``; the message names it.
    """
    gamma = check_number("gamma", gamma, minimum=0.0)
    beta = check_number("beta", beta, minimum=0.0, inclusive=False)
    if gamma == 0:
        return None
    log_p = -1.0 / gamma
    return (log_p - math.log(-math.expm1(log_p))) / beta


def plot_gradient_weights(
    ax: Axes,
    *,
    gamma: float,
    detach: bool | None = None,
    z_max: float = 5.0,
    n_points: int = 601,
) -> dict[str, Line2D]:
    """Draw each loss's gradient weight w against the reward margin z, on ``ax``.

    The curves are :func:`loss_weights` on ``linspace(-z_max, z_max, n_points)``. A second x
    axis on top marks p = sigmoid(z) at :data:`P_TICKS`. Margins the implicit reward misranks
    (z < 0) are shaded, and the in-graph FocalPO sign flip, p = exp(-1/gamma), is marked.

    Args:
        ax: the axes for the curves.
        gamma: exponent of the modulating factor, ``>= 0``.
        detach: which FocalPO forms to draw (see :func:`loss_weights`).
        z_max: half-width of the margin axis, ``> 0``.
        n_points: points per curve, ``>= 2``.

    Returns:
        The curves, keyed like :func:`loss_weights`; each line's x data is z and y data is w.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    _check_ax(ax)
    gamma = check_number("gamma", gamma, minimum=0.0)
    z_max = check_number("z_max", z_max, minimum=0.0, inclusive=False)
    n_points = check_int("n_points", n_points, 2, maximum=100_000)

    z = torch.linspace(-z_max, z_max, n_points, dtype=torch.float64)
    ax.axvspan(-z_max, 0.0, color=GREY, alpha=0.12, lw=0)
    ax.axhline(0.0, color=GREY, lw=0.8)
    ax.text(-0.97 * z_max, 1.28, "z < 0", color=GREY, fontsize=8, va="top")
    ax.text(0.97 * z_max, 1.28, "z > 0", color=GREY, fontsize=8, va="top", ha="right")

    lines = {}
    for name, weight in loss_weights(z, gamma=gamma, detach=detach).items():
        (lines[name],) = ax.plot(
            z.numpy(),
            weight.numpy(),
            "--" if name == "focal" else "-",
            color=LOSS_COLORS[name],
            lw=2,
            label=WEIGHT_LABELS[name],
        )

    flip = sign_flip_margin(gamma=gamma)
    if flip is not None and detach is not True:
        if -z_max < flip < z_max:
            ax.axvline(flip, color=BLUE, ls=":", lw=1.2)
            ax.annotate(
                f"sign flip, p = {math.exp(-1 / gamma):.3g}",
                (flip, -0.17),
                xytext=(4, 0),
                textcoords="offset points",
                color=BLUE,
                fontsize=8,
                va="bottom",
            )
        else:
            ax.text(
                -0.97 * z_max,
                -0.17,
                f"sign flip at z = {flip:.0f}, off the axis",
                color=BLUE,
                fontsize=8,
                va="bottom",
            )

    ax.set_xlim(-z_max, z_max)
    ax.set_ylim(*_WEIGHT_YLIM)
    ax.set_xlabel("reward margin z = βh")
    ax.set_ylabel("gradient weight w = −∂L/∂z")
    top = ax.secondary_xaxis("top", functions=(_sigmoid, _logit))
    top.set_xticks(list(P_TICKS), [f"{p:g}" for p in P_TICKS])
    top.set_xlabel("p = σ(z)")
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.92), fontsize=8)
    return lines


def plot_margin_histogram(
    ax: Axes, z: torch.Tensor, ref_misranked: torch.Tensor, *, z_max: float = 5.0
) -> None:
    """A stacked histogram of measured reward margins, split by whether the reference misranks
    the pair (c > 0): the share of all pairs in each bin, in percent. Margins beyond ``z_max``
    are drawn in the outermost bins.

    Args:
        ax: the axes.
        z: reward margins, shape ``(N,)``.
        ref_misranked: bool, shape ``(N,)``: the reference misranks the pair.
        z_max: half-width of the margin axis, ``> 0``.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    _check_ax(ax)
    z_max = check_number("z_max", z_max, minimum=0.0, inclusive=False)
    _check_z(z, ref_misranked)
    clipped = z.detach().double().clamp(-z_max, z_max).numpy()
    misranked = ref_misranked.numpy()
    edges = torch.linspace(-z_max, z_max, 65).numpy()
    share = 100.0 / len(clipped)
    ax.hist(
        [clipped[~misranked], clipped[misranked]],
        bins=edges,
        stacked=True,
        weights=[[share] * int((~misranked).sum()), [share] * int(misranked.sum())],
        color=[BLUISH_GREEN, VERMILLION],
        label=["reference ranks correctly (c ≤ 0)", "reference misranks (c > 0)"],
    )
    ax.set_xlim(-z_max, z_max)
    ax.set_xlabel("reward margin z = βh of the training pairs")
    ax.set_ylabel("pairs (%)")
    ax.legend(loc="upper left", fontsize=7)


def plot_weight_shares(
    ax: Axes,
    z: torch.Tensor,
    ref_misranked: torch.Tensor,
    *,
    gamma: float,
    detach: bool | None = None,
) -> dict[str, float]:
    """Bars: the share of each loss's total absolute gradient weight sum_i |w(z_i)| that falls
    on the pairs the reference misranks (:func:`weight_share`), with their share of the pairs
    as a dotted line. Each bar is labelled with its value and named in the legend.

    Args:
        ax: the axes.
        z: reward margins, shape ``(N,)``.
        ref_misranked: bool, shape ``(N,)``: the reference misranks the pair.
        gamma, detach: as in :func:`loss_weights`.

    Returns:
        The shares, keyed like :func:`loss_weights`.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    _check_ax(ax)
    _check_z(z, ref_misranked)
    z = z.detach().double()
    shares = {
        name: weight_share(weight, ref_misranked)
        for name, weight in loss_weights(z, gamma=gamma, detach=detach).items()
    }
    for i, (name, share) in enumerate(shares.items()):
        ax.bar(i, 100 * share, color=LOSS_COLORS[name], label=SHORT_LABELS[name])
        ax.annotate(
            f"{share:.0%}",
            (i, 100 * share),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    data_share = ref_misranked.double().mean().item()
    ax.axhline(100 * data_share, color=GREY, ls=":", lw=1.5, label="their share of the pairs")
    ax.set_xticks([])
    ax.set_ylim(0, 100)
    ax.set_ylabel("share of Σ|w| (%)")
    ax.set_title("Σ|w| on pairs the\nreference misranks", fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    return shares


def explorer_figure(
    *,
    gamma: float,
    z: torch.Tensor,
    ref_misranked: torch.Tensor,
    step: int,
    detach: bool | None = None,
    margins_from: str | None = None,
    width: float = 9.0,
    height: float = 5.0,
) -> Figure:
    """The explorer's figure for one gamma and one training step: the weight curves
    (:func:`plot_gradient_weights`), below them the measured margins at that step
    (:func:`plot_margin_histogram`), and beside them the share of each loss's gradient weight on
    the pairs the reference misranks (:func:`plot_weight_shares`).

    Args:
        gamma: exponent of the modulating factor, ``>= 0``.
        z: the reward margins of the pairs at ``step``, shape ``(N,)``.
        ref_misranked: bool, shape ``(N,)``: the reference misranks the pair (c > 0).
        step: the training step ``z`` was measured at (for the title).
        detach: which FocalPO forms to draw (see :func:`loss_weights`).
        margins_from: the run that produced ``z`` (e.g. "the FocalPO γ = 0.5 run"), named in the
            title; None leaves it out.
        width, height: figure size in inches.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    check_int("step", step, 0)
    if margins_from is not None and not isinstance(margins_from, str):
        raise TypeError(f"margins_from must be a str or None, got {_describe(margins_from)}")
    apply_style()
    width = check_number("width", width, minimum=0.0, inclusive=False, maximum=MAX_INCHES)
    height = check_number("height", height, minimum=0.0, inclusive=False, maximum=MAX_INCHES)
    fig = plt.figure(figsize=(width, height), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=(2.6, 1.0), height_ratios=(2.0, 1.0))
    ax = fig.add_subplot(grid[0, 0], label="weights")
    hist_ax = fig.add_subplot(grid[1, 0], sharex=ax)
    share_ax = fig.add_subplot(grid[:, 1], label="shares")
    plot_margin_histogram(hist_ax, z, ref_misranked)
    _draw_gamma(fig, ax, share_ax, gamma, z, ref_misranked, step, detach, margins_from)
    return fig


def _draw_gamma(
    fig: Figure,
    ax: Axes,
    share_ax: Axes,
    gamma: float,
    z: torch.Tensor,
    ref_misranked: torch.Tensor,
    step: int,
    detach: bool | None,
    margins_from: str | None,
) -> None:
    """The parts of :func:`explorer_figure` that depend on gamma: the weight curves, the shares
    and the title."""
    plot_gradient_weights(ax, gamma=gamma, detach=detach)
    ax.set_xlabel("")
    plot_weight_shares(share_ax, z, ref_misranked, gamma=gamma, detach=detach)
    source = f"margins of {margins_from}" if margins_from else "measured margins"
    fig.suptitle(f"Weights at γ = {gamma:g} on the {source}, step {step}")


def explorer_frame_alt(
    gamma: float,
    *,
    step: int,
    z: torch.Tensor,
    ref_misranked: torch.Tensor,
    margins_from: str | None = None,
) -> str:
    """The alt text of the explorer's frame for ``gamma`` at ``step``: what it shows, in words,
    with the frame's measured shares, and the run the margins come from (``margins_from``) when
    given.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    gamma = check_number("gamma", gamma, minimum=0.0)
    check_int("step", step, 0)
    _check_z(z, ref_misranked)
    if margins_from is not None and not isinstance(margins_from, str):
        raise TypeError(f"margins_from must be a str or None, got {_describe(margins_from)}")
    z = z.detach().double()
    if gamma == 0:
        flip = "at γ = 0 every loss is DPO, so the curves coincide"
    else:
        flip = (
            f"in-graph FocalPO turns negative below p = e^(-1/γ) = {math.exp(-1 / gamma):.3g}, "
            f"that is a reward margin z below {sign_flip_margin(gamma=gamma):.3g}"
        )
    if bool((z.abs() < _ZERO_MARGIN).all()):
        spread = "all at z = 0, where p = 1/2 for every pair"
    else:
        spread = (
            f"median z {z[~ref_misranked].median():.2f} on the pairs the reference ranks "
            f"correctly and {z[ref_misranked].median():.2f} on those it misranks"
            if bool(ref_misranked.any() and (~ref_misranked).any())
            else f"median z {z.median():.2f}"
        )
    shares = {
        name: weight_share(weight, ref_misranked)
        for name, weight in loss_weights(z, gamma=gamma).items()
    }
    source = f" of {margins_from}" if margins_from else ""
    listed = ", ".join(f"{SHORT_LABELS[name]} {share:.0%}" for name, share in shares.items())
    return (
        f"γ = {gamma:g}, training step {step}. Top: gradient weight against the reward margin z, "
        f"with p = σ(z) on the top axis, for DPO, FocalPO with p^γ in the graph and detached, and "
        f"the focal direction (1 - p)^γ; {flip}. Bottom: the reward margins of the {len(z)} "
        f"training pairs at this step{source}, {spread}. Right: the share of each loss's total "
        f"|w| on the {int(ref_misranked.sum())} pairs the reference misranks "
        f"({ref_misranked.double().mean().item():.0%} of the pairs): {listed}."
    )


def explorer_frames(
    margins: Mapping[int, torch.Tensor],
    ref_misranked: torch.Tensor,
    *,
    gammas: Sequence[float] = EXPLORER_GAMMAS,
    margins_from: str | None = None,
    dpi: int = 72,
) -> list[list[bytes]]:
    """PNGs of :func:`explorer_figure`, ``frames[i][j]`` for the i-th step of ``margins`` and
    ``gammas[j]``; 9 x 5 inches at ``dpi`` (648 x 360 pixels at 72 dpi), with the colours
    reduced to a palette to keep the page light.

    The layout of a step's first frame serves all its gammas: only the weight curves, the shares
    and the title are redrawn, which makes a frame about twice as fast to draw."""
    dpi = check_int("dpi", dpi, 10, maximum=600)
    gammas = _check_gammas(gammas)
    _check_margins(margins, ref_misranked)
    frames = []
    for step, z in margins.items():
        fig = explorer_figure(
            gamma=gammas[0], z=z, ref_misranked=ref_misranked, step=step, margins_from=margins_from
        )
        fig.canvas.draw()
        fig.set_layout_engine("none")  # freeze the positions constrained layout found
        row = [_png(fig, dpi)]
        for gamma in gammas[1:]:
            fresh = []
            for old in [a for a in fig.axes if a.get_label() in ("weights", "shares")]:
                box, label = old.get_position(), old.get_label()
                old.remove()
                fresh.append(fig.add_axes(box, label=label))
            _draw_gamma(
                fig, *fresh, gamma, z.detach().double(), ref_misranked, step, None, margins_from
            )
            row.append(_png(fig, dpi))
        plt.close(fig)
        frames.append(row)
    return frames


def _png(fig: Figure, dpi: int) -> bytes:
    """The figure as a PNG with its colours reduced to a 96-colour palette."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    palette = Image.open(buffer).convert("RGB").quantize(colors=96)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


def gamma_explorer_static(
    margins: Mapping[int, torch.Tensor],
    ref_misranked: torch.Tensor,
    *,
    gammas: Sequence[float] = EXPLORER_GAMMAS,
    run: str = "a training run",
    dpi: int = 72,
) -> widgets.VBox:
    """A gamma slider and a training-step slider that work on a static web page, with no kernel.

    Every (step, gamma) figure is drawn in advance (:func:`explorer_frames`) and shown as an
    ``<img>`` with alt text (:func:`explorer_frame_alt`) in an ``ipywidgets.HTML``. The frames of
    one step form an ``ipywidgets.Stack``, and the steps' stacks form an outer ``Stack``. The
    step slider picks the outer stack's child and the gamma slider picks the child of every
    inner stack, through ``jslink`` on each slider's ``index``: links the browser runs from the
    saved widget state. (``ipywidgets.Image`` has no alt text, and a ``tooltip`` on it stops
    html-manager 1.0 from drawing it at all.)

    Args:
        margins: ``{step: z}``, the measured reward margins z, shape ``(N,)``, of the same pairs
            at two or more training steps, in the order the step slider shows them.
        ref_misranked: bool, shape ``(N,)``: the reference misranks the pair (c > 0).
        gammas: the frames' gammas, at least two, each ``>= 0``, distinct.
        run: what produced ``margins``, for the title (e.g. "FocalPO γ = 0.5").
        dpi: pixels per inch of the 9 x 5 inch frames.

    Returns:
        ``VBox([title, gamma slider, step slider, stack, caption])``, carrying the CSS class
        ``focalpo-gamma-explorer``; the sliders' descriptions are "γ" and "step".

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    gammas = _check_gammas(gammas)
    _check_margins(margins, ref_misranked)
    if len(margins) < 2:
        raise ValueError(f"margins must hold at least two steps, got {list(margins)}")
    if not isinstance(run, str):
        raise TypeError(f"run must be a str, got {_describe(run)}")
    check_int("dpi", dpi, 10, maximum=600)
    steps = list(margins)
    width, height = 9 * dpi, 5 * dpi
    frames = explorer_frames(margins, ref_misranked, gammas=gammas, margins_from=run, dpi=dpi)
    stacks = []
    for step, row in zip(steps, frames, strict=True):
        images = [
            widgets.HTML(
                f'<img class="focalpo-explorer-frame" src="data:image/png;base64,'
                f'{base64.b64encode(png).decode("ascii")}" width="{width}" height="{height}" '
                'alt="'
                + html.escape(
                    explorer_frame_alt(
                        g, step=step, z=margins[step], ref_misranked=ref_misranked, margins_from=run
                    )
                )
                + '" style="width: 100%; height: auto">',
                layout=widgets.Layout(width="100%", max_width=f"{width}px"),
            )
            for g, png in zip(gammas, row, strict=True)
        ]
        stacks.append(widgets.Stack(children=images, selected_index=0))
    outer = widgets.Stack(children=stacks, selected_index=0)
    layout = widgets.Layout(width="min(100%, 480px)")
    gamma_slider = widgets.SelectionSlider(
        options=[(f"{g:g}", g) for g in gammas], value=gammas[0], description="γ", layout=layout
    )
    step_slider = widgets.SelectionSlider(
        options=[(str(s), s) for s in steps], value=steps[0], description="step", layout=layout
    )
    for stack in stacks:
        widgets.jslink((gamma_slider, "index"), (stack, "selected_index"))
    widgets.jslink((step_slider, "index"), (outer, "selected_index"))
    title = widgets.HTML(
        "<b>γ explorer</b>: choose γ and the training step. Every frame shows the measured margins "
        f"of one run, {html.escape(run)}: moving γ re-weights those margins with each loss, it "
        "does not train at that γ. The frames were drawn when the page was built, so the sliders "
        "work without a kernel."
    )
    caption = widgets.HTML(
        "<i>Top left: the gradient weight w = −∂L/∂z of each loss against the reward margin z, "
        "with p = σ(z) on the top axis. Bottom left: the training pairs' margins at the chosen "
        "step, split by whether the reference misranks the pair. Right: the share of each loss's "
        "total |w| on the pairs the reference misranks; the dotted line is their share of the "
        "pairs.</i>"
    )
    box = widgets.VBox([title, gamma_slider, step_slider, outer, caption])
    box.add_class("focalpo-gamma-explorer")
    return box


def gamma_explorer(
    margins: Mapping[int, torch.Tensor], ref_misranked: torch.Tensor, *, gamma: float = 0.5
) -> widgets.VBox:
    """The live gamma explorer: a continuous gamma slider, a step slider and a choice of FocalPO
    form redraw :func:`explorer_figure`. Needs a running kernel (Jupyter, Colab); on a static
    page it is dead.

    Args:
        margins, ref_misranked: as in :func:`gamma_explorer_static` (one step is enough).
        gamma: initial gamma, in [0, 5].

    Returns:
        ``VBox([title, controls, form, output])``.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    gamma = check_number("gamma", gamma, minimum=0.0, maximum=5.0)
    _check_margins(margins, ref_misranked)
    gamma_slider = widgets.FloatSlider(value=gamma, min=0.0, max=5.0, step=0.05, description="γ")
    step_slider = widgets.SelectionSlider(options=list(margins), description="step")
    form = widgets.ToggleButtons(
        options=[("both", None), ("in graph", False), ("detached", True)],
        value=None,
        description="FocalPO p^γ",
    )

    def draw(gamma: float, step: int, detach: bool | None) -> None:
        fig = explorer_figure(
            gamma=gamma, z=margins[step], ref_misranked=ref_misranked, step=step, detach=detach
        )
        display(fig)
        plt.close(fig)

    output = widgets.interactive_output(
        draw, {"gamma": gamma_slider, "step": step_slider, "detach": form}
    )
    title = widgets.HTML("<b>Live γ explorer</b> (needs a running kernel: Jupyter or Colab)")
    return widgets.VBox([title, widgets.HBox([gamma_slider, step_slider]), form, output])


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=float)))


def _logit(p):
    p = np.clip(np.asarray(p, dtype=float), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def _check_gammas(gammas: Sequence[float]) -> list[float]:
    if isinstance(gammas, (str, bytes)) or not isinstance(gammas, Sequence):
        raise TypeError(f"gammas must be a sequence of numbers, got {_describe(gammas)}")
    gammas = [check_number("gammas", g, minimum=0.0) for g in gammas]
    if len(gammas) < 2 or len(set(gammas)) != len(gammas):
        raise ValueError(f"gammas must hold at least two distinct values, got {gammas}")
    return gammas


def _check_ax(ax: object) -> None:
    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")


def _check_z(z: torch.Tensor, ref_misranked: torch.Tensor) -> None:
    """One step's margins ``z``: errors name ``z``, not the margins mapping."""
    check_float_tensor("z", z, ndim=1)
    if not bool(torch.isfinite(z).all()):
        raise ValueError("z holds NaN or infinite values")
    if isinstance(ref_misranked, torch.Tensor) and z.shape != ref_misranked.shape:
        raise ValueError(
            f"z has shape {tuple(z.shape)}, expected {tuple(ref_misranked.shape)} like "
            "ref_misranked"
        )
    _check_margins({0: z}, ref_misranked)


def _check_margins(margins: Mapping[int, torch.Tensor], ref_misranked: torch.Tensor) -> None:
    """margins: a non-empty {step: z} of finite float (N,) tensors; ref_misranked: bool (N,)."""
    if not isinstance(ref_misranked, torch.Tensor) or ref_misranked.dtype != torch.bool:
        raise TypeError(f"ref_misranked must be a bool tensor, got {_describe(ref_misranked)}")
    if ref_misranked.ndim != 1 or ref_misranked.numel() == 0:
        raise ValueError(
            f"ref_misranked must have shape (N,) with N >= 1, got {tuple(ref_misranked.shape)}"
        )
    if not isinstance(margins, Mapping) or not margins:
        raise TypeError(
            f"margins must be a non-empty {{step: z}} mapping, got {_describe(margins)}"
        )
    for step, z in margins.items():
        check_int("margins' steps", step, 0)
        check_float_tensor(f"margins[{step}]", z, ndim=1)
        if z.shape != ref_misranked.shape:
            raise ValueError(
                f"margins[{step}] has shape {tuple(z.shape)}, expected "
                f"{tuple(ref_misranked.shape)} like ref_misranked"
            )
        if not bool(torch.isfinite(z).all()):
            raise ValueError(f"margins[{step}] holds NaN or infinite values")


def _focal_direction_weight(z: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """w(z) of -(1 - p)**gamma log p, by autograd through the package's focal loss."""
    z = z.detach().clone().requires_grad_(True)
    loss = focal_loss(z, torch.ones_like(z), gamma=gamma, alpha=None, reduction="sum")
    (grad,) = torch.autograd.grad(loss, z)
    return -grad


# --- Training curves of focalpo_mini.trainer.TrainResult ---------------------------------------

METRIC_LABELS = {
    "loss": "loss (nats per pair)",
    "rewards/accuracies": "reward accuracy (fraction z > 0)",
    "rewards/margins": "mean reward margin z",
    "rewards/chosen": "mean chosen reward (β·log-ratio)",
    "rewards/rejected": "mean rejected reward (β·log-ratio)",
    "logps/chosen": "chosen log-prob (nats)",
    "logps/rejected": "rejected log-prob (nats)",
    "focal/weight_mean": "mean focal factor p^γ",
    "reward_accuracy": "reward accuracy (fraction z > 0)",
    "ranking_accuracy": "ranking accuracy (fraction πθ(y_w) ≥ πθ(y_l))",
    "margin": "mean reward margin z",
}
"""Axis labels, with units, for the metric names that focalpo_mini.trainer logs."""


def plot_training(
    runs: dict,
    metrics: Sequence[str] = ("loss", "rewards/accuracies"),
    *,
    split: str = "train",
    title: str | None = None,
) -> Figure:
    """One panel per metric, one line per run, against the optimizer step.

    Args:
        runs: ``{label: TrainResult}``. A label naming a loss in ``LOSS_COLORS`` (``"dpo"``,
            ``"focalpo"``, ...) gets that loss's colour; other labels follow the palette.
        metrics: names from ``TrainResult.metric_names()``.
        split: ``"train"`` or ``"eval"``.
        title: the figure's title (state the finding).

    Returns:
        The figure.
    """
    if not isinstance(runs, Mapping) or not all(hasattr(r, "series") for r in runs.values()):
        raise TypeError(f"runs must be a dict {{label: TrainResult}}, got {_describe(runs)}")
    if not runs:
        raise ValueError("runs must hold at least one TrainResult")
    if (
        not isinstance(metrics, (list, tuple))
        or not metrics
        or not all(isinstance(m, str) for m in metrics)
    ):
        raise TypeError(
            f"metrics must be a non-empty list of metric names, got {metrics!r}"
            + (f" (for one metric, pass [{metrics!r}])" if isinstance(metrics, str) else "")
        )
    fig, axes = new_figure(len(metrics), width=3.4 * len(metrics) + 0.6)
    axes = axes if isinstance(axes, list) else [axes]
    for ax, metric in zip(axes, metrics, strict=True):
        for i, (label, result) in enumerate(runs.items()):
            color = LOSS_COLORS.get(label, OKABE_ITO[i % len(OKABE_ITO)])
            ax.plot(*result.series(metric, split=split), label=label, color=color)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    axes[0].legend()
    if title is not None:
        fig.suptitle(title)
    return fig


def plot_groups(
    result,
    metric: str = "reward_accuracy",
    *,
    split: str = "eval",
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Chen et al.'s groups over training: pairs the reference ranks correctly vs incorrectly.

    Args:
        result: a ``TrainResult``.
        metric: ``"reward_accuracy"``, ``"ranking_accuracy"`` or ``"margin"``.
        split: ``"train"`` or ``"eval"``.
        title: the axes' title (state the finding).
        ax: axes to draw on; a new figure when None.

    Returns:
        The axes.
    """
    if ax is not None:
        _check_ax(ax)
    if not hasattr(result, "series"):
        raise TypeError(f"result must be a TrainResult, got {type(result).__name__}")
    if metric not in ("reward_accuracy", "ranking_accuracy", "margin"):
        raise ValueError(
            f"metric must be 'reward_accuracy', 'ranking_accuracy' or 'margin', got {metric!r}"
        )
    if ax is None:
        _, ax = new_figure()
    for group, color, label in (
        ("ref_correct", BLUISH_GREEN, "reference ranks correctly"),
        ("ref_incorrect", VERMILLION, "reference misranks"),
    ):
        ax.plot(*result.series(f"groups/{group}/{metric}", split=split), color=color, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.legend()
    if title is not None:
        ax.set_title(title)
    return ax
