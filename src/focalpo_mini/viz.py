"""Plots and widgets for the book: one colour-blind-safe style and the gamma explorer.

Colours are the Okabe-Ito palette (Okabe and Ito, 2008), distinguishable under the common forms of
colour blindness. Each loss keeps one colour throughout the book (``LOSS_COLORS``).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence

import ipywidgets as widgets
import matplotlib as mpl
import matplotlib.pyplot as plt
import torch
from cycler import cycler
from IPython.display import display
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from focalpo_mini._checks import check_number
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

CORRECT_SHADE = "#009E7318"  # bluish green, mostly transparent: correctly ranked pairs (z > 0)
INCORRECT_SHADE = "#D55E0018"  # vermillion, mostly transparent: misranked pairs (z < 0)


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
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be an int >= 1, got {ncols!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be > 0, got {width} and {height}")
    apply_style()
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), layout="constrained")
    return fig, (axes if ncols == 1 else list(axes))


# --- The gamma explorer: gradient weight against the reward margin -----------------------------

EXPLORER_GAMMAS = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0)
"""The gamma grid of the static explorer's frames."""

WEIGHT_LABELS = {
    "dpo": r"DPO, $w = 1-p$",
    "focalpo": r"FocalPO, $p^\gamma$ in the graph",
    "focalpo_detached": r"FocalPO, $p^\gamma$ detached",
    "focal": r"focal direction, $(1-p)^\gamma$",
}
"""Legend label of each gradient-weight curve, keyed like ``LOSS_COLORS``."""

_SHORT_LABELS = {
    "dpo": "DPO",
    "focalpo": "FocalPO\nin graph",
    "focalpo_detached": "FocalPO\ndetached",
    "focal": "focal\ndirection",
}
_WEIGHT_YLIM = (-0.2, 1.35)  # holds every curve for gamma in [0, 5], so frames share one scale


def reference_margins(*, mean: float = 5.0, std: float = 20.0, n: int = 2001) -> torch.Tensor:
    """A deterministic population of reward margins h: the n quantiles of Normal(mean, std**2).

    An illustrative population, not a measured one: with the defaults and beta = 0.1 about 40% of
    the pairs are misranked (h < 0), as for a model early in preference training.

    Args:
        mean, std: mean and standard deviation of h, in nats (``std > 0``).
        n: number of pairs, ``>= 2``.

    Returns:
        h, shape ``(n,)``, float64, sorted ascending.

    Raises:
        ValueError: if ``std <= 0`` or ``n < 2``.
    """
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.distributions.Normal(float(mean), float(std)).icdf(levels)


def loss_weights(
    z: torch.Tensor, *, gamma: float, detach: bool | None = None
) -> dict[str, torch.Tensor]:
    """The gradient weight w(z) (dL/dz = -w) of each loss the explorer compares.

    Keys: ``"dpo"``; ``"focalpo"`` (factor in the graph) unless ``detach`` is True;
    ``"focalpo_detached"`` unless ``detach`` is False; ``"focal"``, focal loss's factor
    (1 - p)**gamma on the DPO loss, whose weight comes from autograd through
    :func:`focalpo_mini.losses.focal_loss` (target 1, no alpha).

    Args:
        z: preference logits, shape ``(N,)``, floating point.
        gamma: exponent of the modulating factor, ``>= 0``.
        detach: None for both FocalPO forms, True for the detached one only, False for the
            in-graph one only.

    Returns:
        A dict of weights, each of shape ``(N,)`` and dtype ``z.dtype``, in the order above.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    if detach not in (None, True, False):
        raise TypeError(f"detach must be None, True or False, got {detach!r}")
    weights = {"dpo": gradient_weight(z, gamma=0.0)}
    if detach is not True:
        weights["focalpo"] = gradient_weight(z, gamma=gamma)
    if detach is not False:
        weights["focalpo_detached"] = gradient_weight(z, gamma=gamma, detach_weight=True)
    weights["focal"] = _focal_direction_weight(z, gamma=gamma)
    return weights


def weight_split(weight: torch.Tensor, z: torch.Tensor) -> tuple[float, float]:
    """Mean gradient weight per pair that goes to misranked (z < 0) and to correctly ranked (z > 0)
    pairs: ``(mean(w * [z < 0]), mean(w * [z > 0]))``. The two add up to ``mean(w)`` when no z is 0.

    Args:
        weight, z: shape ``(N,)``, the weight of each pair and its preference logit.
    """
    if weight.shape != z.shape or weight.ndim != 1:
        raise ValueError(
            f"weight and z must have the same shape (N,), got {tuple(weight.shape)} "
            f"and {tuple(z.shape)}"
        )
    misranked = (weight * (z < 0)).mean().item()
    correct = (weight * (z > 0)).mean().item()
    return misranked, correct


def sign_flip_margin(*, gamma: float, beta: float) -> float | None:
    """The margin h below which the in-graph FocalPO gradient pushes z down: p = exp(-1/gamma),
    so h = logit(exp(-1/gamma)) / beta. None for gamma = 0 (DPO never flips)."""
    if gamma == 0:
        return None
    log_p = -1.0 / gamma
    return (log_p - math.log(-math.expm1(log_p))) / beta


def plot_gradient_weights(
    ax: Axes,
    *,
    gamma: float,
    beta: float = 0.1,
    detach: bool | None = None,
    h_max: float = 60.0,
    n_points: int = 601,
    split_ax: Axes | None = None,
    margins: torch.Tensor | None = None,
) -> dict[str, Line2D]:
    """Draw each loss's gradient weight w against the reward margin h, on ``ax``.

    The curves are :func:`loss_weights` at z = beta * h for h on ``linspace(-h_max, h_max,
    n_points)``. Misranked (h < 0) and correctly ranked (h > 0) pairs are shaded, and the
    in-graph FocalPO sign flip, p = exp(-1/gamma), is marked. With ``split_ax``, a bar chart there
    shows how each loss's weight divides between misranked and correctly ranked pairs of the
    population ``margins`` (default :func:`reference_margins`). Both explorers draw with this.

    Args:
        ax: the axes for the curves.
        gamma: exponent of the modulating factor, ``>= 0``.
        beta: the DPO beta, ``> 0``; z = beta * h.
        detach: which FocalPO forms to draw (see :func:`loss_weights`).
        h_max: half-width of the margin axis, nats, ``> 0``.
        n_points: points per curve, ``>= 2``.
        split_ax: optional axes for the bar chart.
        margins: optional population of margins h for the bar chart, shape ``(N,)``, nats.

    Returns:
        The curves, keyed like :func:`loss_weights`; each line's x data is h and y data is w.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    gamma = check_number("gamma", gamma, minimum=0.0)
    beta = check_number("beta", beta, minimum=0.0, inclusive=False)
    h_max = check_number("h_max", h_max, minimum=0.0, inclusive=False)
    if not isinstance(n_points, int) or n_points < 2:
        raise ValueError(f"n_points must be an int >= 2, got {n_points!r}")

    h = torch.linspace(-h_max, h_max, n_points, dtype=torch.float64)
    ax.axvspan(-h_max, 0.0, color=INCORRECT_SHADE, lw=0)
    ax.axvspan(0.0, h_max, color=CORRECT_SHADE, lw=0)
    ax.axhline(0.0, color=GREY, lw=0.8)
    ax.text(-0.97 * h_max, 1.28, "misranked (h < 0)", color=VERMILLION, fontsize=9, va="top")
    ax.text(
        0.97 * h_max,
        1.28,
        "correctly ranked (h > 0)",
        color=BLUISH_GREEN,
        fontsize=9,
        va="top",
        ha="right",
    )

    lines = {}
    for name, weight in loss_weights(beta * h, gamma=gamma, detach=detach).items():
        style = "--" if name == "focal" else "-"
        (lines[name],) = ax.plot(
            h.numpy(),
            weight.numpy(),
            style,
            color=LOSS_COLORS[name],
            lw=2,
            label=WEIGHT_LABELS[name],
        )

    flip = sign_flip_margin(gamma=gamma, beta=beta)
    if flip is not None and detach is not True:
        if -h_max < flip < h_max:
            ax.axvline(flip, color=BLUE, ls=":", lw=1.2)
            label = f"sign flip\n$p = e^{{-1/\\gamma}}$ = {math.exp(-1 / gamma):.3f}"
            ax.annotate(
                label,
                (flip, -0.17),
                xytext=(4, 0),
                textcoords="offset points",
                color=BLUE,
                fontsize=8,
                va="bottom",
            )
        else:
            ax.text(
                -0.97 * h_max,
                -0.17,
                f"sign flip at h = {flip:.0f}, off the axis",
                color=BLUE,
                fontsize=8,
                va="bottom",
            )

    ax.set_xlim(-h_max, h_max)
    ax.set_ylim(*_WEIGHT_YLIM)
    ax.set_xlabel(f"reward margin h (nats); z = βh, β = {beta:g}")
    ax.set_ylabel("gradient weight w = −∂L/∂z")
    ax.set_title(f"γ = {gamma:g}: gradient weight of each loss against the margin")
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.9))

    if split_ax is not None:
        _plot_weight_split(split_ax, gamma=gamma, beta=beta, detach=detach, margins=margins)
    return lines


def explorer_figure(
    *,
    gamma: float,
    beta: float = 0.1,
    detach: bool | None = None,
    width: float = 8.0,
    height: float = 4.5,
) -> Figure:
    """The explorer's figure: the weight curves and, beside them, the weight split of
    :func:`reference_margins` (see :func:`plot_gradient_weights`). Width and height in inches."""
    fig, (ax, split_ax) = plt.subplots(
        1, 2, figsize=(width, height), layout="constrained", width_ratios=(2.4, 1.0)
    )
    plot_gradient_weights(ax, gamma=gamma, beta=beta, detach=detach, split_ax=split_ax)
    return fig


def explorer_frames(
    gammas: Sequence[float] = EXPLORER_GAMMAS, *, beta: float = 0.1, dpi: int = 80
) -> list[bytes]:
    """One PNG of :func:`explorer_figure` per gamma, each 8 x 4.5 inches at ``dpi`` (640 x 360
    pixels at the default 80 dpi)."""
    frames = []
    for gamma in gammas:
        fig = explorer_figure(gamma=gamma, beta=beta)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches=None)
        plt.close(fig)
        frames.append(buffer.getvalue())
    return frames


def explorer_frame_alt(gamma: float, *, beta: float) -> str:
    """The alt text of the explorer's frame for ``gamma``: what the figure shows, in words."""
    if gamma == 0:
        flip = "every loss is DPO at γ = 0, so all the curves coincide"
    else:
        p = math.exp(-1 / gamma)  # the sign flip; as a margin h = logit(p) / beta
        flip = (
            f"in-graph FocalPO turns negative below p = e^(-1/γ) = {p:.3g}, "
            f"that is a margin h below {math.log(p / (1 - p)) / beta:.3g} nats"
        )
    return (
        f"Gradient weight against the reward margin at γ = {gamma:g}, β = {beta:g}, for DPO, "
        f"FocalPO with p^γ in the graph and detached, and the focal direction (1 - p)^γ; {flip}. "
        "Bars: the mean weight per pair each loss puts on misranked and on correctly ranked pairs."
    )


def gamma_explorer_static(
    gammas: Sequence[float] = EXPLORER_GAMMAS, *, beta: float = 0.1, dpi: int = 80
) -> widgets.VBox:
    """A gamma slider that works on a static web page, with no kernel.

    Each gamma's figure is drawn in advance (:func:`explorer_frames`) and shown as an
    ``<img>`` with alt text (:func:`explorer_frame_alt`) in an ``ipywidgets.HTML`` child of an
    ``ipywidgets.Stack``; a ``SelectionSlider`` picks the child through ``jslink`` on its
    ``index``, a link the browser runs from the saved widget state. (``ipywidgets.Image`` has no
    alt text, and a ``tooltip`` on it stops html-manager 1.0 from drawing it at all.)

    Args:
        gammas: the frames' gammas, at least two, each ``>= 0``, distinct.
        beta: the DPO beta of every frame, ``> 0``.
        dpi: pixels per inch of the 8 x 4.5 inch frames.

    Returns:
        ``VBox([title, slider, stack, caption])``, carrying the CSS class
        ``focalpo-gamma-explorer``; the slider's description is "γ".

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    gammas = [check_number("gammas", g, minimum=0.0) for g in gammas]
    if len(gammas) < 2 or len(set(gammas)) != len(gammas):
        raise ValueError(f"gammas must hold at least two distinct values, got {gammas}")
    beta = check_number("beta", beta, minimum=0.0, inclusive=False)
    width, height = 8 * dpi, round(4.5 * dpi)
    images = [
        widgets.HTML(
            f'<img class="focalpo-explorer-frame" src="data:image/png;base64,'
            f'{base64.b64encode(frame).decode("ascii")}" width="{width}" height="{height}" '
            f'alt="{html.escape(explorer_frame_alt(g, beta=beta))}" '
            'style="width: 100%; height: auto">',
            layout=widgets.Layout(width="100%", max_width=f"{width}px"),
        )
        for g, frame in zip(gammas, explorer_frames(gammas, beta=beta, dpi=dpi), strict=True)
    ]
    stack = widgets.Stack(children=images, selected_index=0)
    slider = widgets.SelectionSlider(
        options=[(f"{g:g}", g) for g in gammas],
        value=gammas[0],
        description="γ",
        continuous_update=True,
        layout=widgets.Layout(width="min(100%, 480px)"),
    )
    widgets.jslink((slider, "index"), (stack, "selected_index"))
    title = widgets.HTML(
        "<b>γ explorer</b>: move the slider to change γ (frames drawn in advance, β = "
        f"{beta:g}; works without a kernel)."
    )
    caption = widgets.HTML(
        "<i>Left: gradient weight of each loss against the reward margin. Right: mean weight per "
        "pair on misranked and on correctly ranked pairs of an illustrative population.</i>"
    )
    box = widgets.VBox([title, slider, stack, caption])
    box.add_class("focalpo-gamma-explorer")
    return box


def gamma_explorer(*, gamma: float = 0.5, beta: float = 0.1) -> widgets.VBox:
    """The live gamma explorer: sliders for gamma and beta and a choice of FocalPO form redraw
    :func:`explorer_figure`. Needs a running kernel (Jupyter, Colab); on a static page it is dead.

    Args:
        gamma: initial gamma, in [0, 5].
        beta: initial beta, in [0.01, 0.5].

    Returns:
        ``VBox([title, controls, output])``.
    """
    gamma = check_number("gamma", gamma, minimum=0.0, maximum=5.0)
    beta = check_number("beta", beta, minimum=0.01, maximum=0.5)
    gamma_slider = widgets.FloatSlider(value=gamma, min=0.0, max=5.0, step=0.05, description="γ")
    beta_slider = widgets.FloatSlider(value=beta, min=0.01, max=0.5, step=0.01, description="β")
    form = widgets.ToggleButtons(
        options=[("both", None), ("in graph", False), ("detached", True)],
        value=None,
        description="FocalPO p^γ",
    )

    def draw(gamma: float, beta: float, detach: bool | None) -> None:
        fig = explorer_figure(gamma=gamma, beta=beta, detach=detach)
        display(fig)
        plt.close(fig)

    output = widgets.interactive_output(
        draw, {"gamma": gamma_slider, "beta": beta_slider, "detach": form}
    )
    title = widgets.HTML("<b>Live γ explorer</b> (needs a running kernel: Jupyter or Colab)")
    return widgets.VBox([title, widgets.HBox([gamma_slider, beta_slider]), form, output])


def _focal_direction_weight(z: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """w(z) of -(1 - p)**gamma log p, by autograd through the package's focal loss."""
    z = z.detach().clone().requires_grad_(True)
    loss = focal_loss(z, torch.ones_like(z), gamma=gamma, alpha=None, reduction="sum")
    (grad,) = torch.autograd.grad(loss, z)
    return -grad


def _plot_weight_split(
    ax: Axes,
    *,
    gamma: float,
    beta: float,
    detach: bool | None,
    margins: torch.Tensor | None,
) -> None:
    h = reference_margins() if margins is None else margins.detach().to(torch.float64)
    z = beta * h
    weights = loss_weights(z, gamma=gamma, detach=detach)
    names = list(weights)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        misranked, correct = weight_split(weights[name], z)
        offset = (i - (len(names) - 1) / 2) * width
        ax.bar(
            [offset, 1 + offset],
            [misranked, correct],
            width=width,
            color=LOSS_COLORS[name],
            label=_SHORT_LABELS[name].replace("\n", " "),
        )
    ax.axhline(0.0, color=GREY, lw=0.8)
    ax.set_xticks([0, 1], ["misranked", "correct"])
    ax.set_ylim(-0.1, 0.75)
    ax.set_ylabel("mean weight per pair")
    share = (z < 0).double().mean().item()
    ax.set_title(f"Where it goes\n({share:.0%} misranked)")


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
    if not runs:
        raise ValueError("runs must hold at least one TrainResult")
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
