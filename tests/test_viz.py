"""The gradient-weight plot draws the package's weights, the weight shares and the margin histogram
are what they claim to be, and the static gamma explorer is a grid of distinct, described frames
that two sliders drive through browser-side links."""

from __future__ import annotations

import base64
import html
import itertools
import math
import re

import ipywidgets as widgets
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from ipywidgets.widgets.widget_link import Link

from focalpo_mini import viz
from focalpo_mini.losses import gradient_weight

GAMMAS = (0.0, 0.5, 2.0)
STEPS = (0, 10)
N_PAIRS = 40


def _margins() -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Margins of 40 pairs at step 0 (all zero, as at the start of training) and at step 10."""
    moved = torch.linspace(-3.0, 3.0, N_PAIRS, dtype=torch.float64)
    ref_misranked = torch.arange(N_PAIRS) % 4 == 0
    return {0: torch.zeros(N_PAIRS, dtype=torch.float64), 10: moved}, ref_misranked


@pytest.fixture(scope="module")
def explorer() -> widgets.VBox:
    margins, ref_misranked = _margins()
    return viz.gamma_explorer_static(margins, ref_misranked, gammas=GAMMAS, run="a test", dpi=30)


def _children(box: widgets.Box, kind: type) -> list[widgets.Widget]:
    return [child for child in box.children if isinstance(child, kind)]


def _sliders(explorer) -> dict[str, widgets.SelectionSlider]:
    return {s.description: s for s in _children(explorer, widgets.SelectionSlider)}


def _frames(explorer) -> list[list[tuple[bytes, str]]]:
    """Each frame's PNG bytes and alt text, read back from its HTML: ``frames[step][gamma]``."""
    (outer,) = _children(explorer, widgets.Stack)
    grid = []
    for inner in outer.children:
        assert isinstance(inner, widgets.Stack)
        row = []
        for child in inner.children:
            assert isinstance(child, widgets.HTML)
            (img,) = re.findall(r"<img [^>]*>", child.value)
            data = re.search(r'src="data:image/png;base64,([^"]+)"', img).group(1)
            alt = html.unescape(re.search(r'alt="([^"]*)"', img)[1])
            row.append((base64.b64decode(data), alt))
        grid.append(row)
    return grid


def _links(source, target) -> list[Link]:
    return [
        w
        for w in widgets.Widget.widgets.values()
        if isinstance(w, Link) and w.source == source and w.target == target
    ]


def test_static_explorer_has_one_described_png_per_step_and_gamma(explorer):
    margins, ref_misranked = _margins()
    frames = _frames(explorer)
    assert [len(row) for row in frames] == [len(GAMMAS)] * len(STEPS)
    for step, row in zip(STEPS, frames, strict=True):
        for gamma, (png, alt) in zip(GAMMAS, row, strict=True):
            assert png[:4] == b"\x89PNG"
            expected = viz.explorer_frame_alt(
                gamma,
                step=step,
                z=margins[step],
                ref_misranked=ref_misranked,
                margins_from="a test",
            )
            assert alt == expected
            assert "training pairs at this step of a test," in alt
            assert f"γ = {gamma:g}, training step {step}." in alt


def test_static_explorer_frames_differ_between_gammas_and_steps(explorer):
    pngs = [png for row in _frames(explorer) for png, _ in row]
    assert len(set(pngs)) == len(GAMMAS) * len(STEPS)


def test_static_explorer_sliders_are_linked_to_the_stacks(explorer):
    sliders = _sliders(explorer)
    assert list(sliders) == ["γ", "step"]
    gamma, step = sliders["γ"], sliders["step"]
    assert [value for _, value in gamma.options] == list(GAMMAS)
    assert [value for _, value in step.options] == list(STEPS)
    (outer,) = _children(explorer, widgets.Stack)
    assert len(_links((step, "index"), (outer, "selected_index"))) == 1
    for inner in outer.children:
        assert len(_links((gamma, "index"), (inner, "selected_index"))) == 1
        assert inner.selected_index == gamma.index == 0
    assert outer.selected_index == step.index == 0


def test_static_explorer_states_where_the_margins_come_from(explorer):
    (title, caption) = [_children(explorer, widgets.HTML)[i] for i in (0, -1)]
    assert "a test" in title.value and "without a kernel" in title.value
    assert "does not train at that γ" in title.value
    assert "share of each loss's total |w|" in caption.value


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gammas": [0.5]}, "gammas"),
        ({"gammas": [0.5, -1.0]}, "gammas"),
        ({"run": 3}, "run"),
    ],
)
def test_static_explorer_rejects_bad_arguments(kwargs, match):
    margins, ref_misranked = _margins()
    with pytest.raises((TypeError, ValueError), match=match):
        viz.gamma_explorer_static(margins, ref_misranked, **kwargs)


def test_static_explorer_needs_two_steps_of_matching_margins():
    margins, ref_misranked = _margins()
    with pytest.raises(ValueError, match="at least two steps"):
        viz.gamma_explorer_static({0: margins[0]}, ref_misranked)
    with pytest.raises(ValueError, match=r"margins\[10\]"):
        viz.gamma_explorer_static({0: margins[0], 10: margins[10][:-1]}, ref_misranked)
    with pytest.raises(TypeError, match="ref_misranked"):
        viz.gamma_explorer_static(margins, ref_misranked.long())
    with pytest.raises(ValueError, match="NaN"):
        viz.gamma_explorer_static({0: margins[0], 10: margins[10] * math.nan}, ref_misranked)


def test_frame_alt_text_states_the_sign_flip_and_the_shares():
    margins, ref_misranked = _margins()
    z = margins[10]
    alt = viz.explorer_frame_alt(0.5, step=10, z=z, ref_misranked=ref_misranked)
    assert "0.135" in alt  # e^-2
    flip_z = math.log(math.exp(-0.5) / (1 - math.exp(-0.5)))  # gamma = 2: logit(e^-1/2)
    assert f"z below {flip_z:.3g}" in viz.explorer_frame_alt(
        2.0, step=10, z=z, ref_misranked=ref_misranked
    )
    assert "coincide" in viz.explorer_frame_alt(0.0, step=10, z=z, ref_misranked=ref_misranked)
    # The DPO share, computed here from its closed form w = 1 - p.
    w = 1 - torch.sigmoid(z)
    assert f"DPO {(w[ref_misranked].sum() / w.sum()).item():.0%}" in alt
    assert f"the {int(ref_misranked.sum())} pairs the reference misranks" in alt
    at_start = viz.explorer_frame_alt(0.5, step=0, z=margins[0], ref_misranked=ref_misranked)
    assert "all at z = 0, where p = 1/2 for every pair" in at_start
    assert "DPO 25%, FocalPO, in graph 25%" in at_start  # at z = 0 every weight is the same


@pytest.mark.parametrize(("gamma", "beta", "match"), [(-1.0, 0.1, "gamma"), (0.5, 0.0, "beta")])
def test_sign_flip_margin_rejects_bad_arguments(gamma, beta, match):
    with pytest.raises(ValueError, match=match):
        viz.sign_flip_margin(gamma=gamma, beta=beta)


def test_frame_alt_rejects_a_negative_gamma_and_step():
    margins, ref_misranked = _margins()
    with pytest.raises(ValueError, match="gamma"):
        viz.explorer_frame_alt(-1, step=0, z=margins[0], ref_misranked=ref_misranked)
    with pytest.raises(ValueError, match="step"):
        viz.explorer_frame_alt(0.5, step=-1, z=margins[0], ref_misranked=ref_misranked)


@pytest.mark.parametrize(("detach", "names"), [
    (None, ["dpo", "focalpo", "focalpo_detached", "focal"]),
    (False, ["dpo", "focalpo", "focal"]),
    (True, ["dpo", "focalpo_detached", "focal"]),
])  # fmt: skip
def test_plot_draws_one_labelled_line_per_loss(detach, names):
    fig, ax = plt.subplots()
    lines = viz.plot_gradient_weights(ax, gamma=0.5, detach=detach)
    assert list(lines) == names
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == [viz.WEIGHT_LABELS[name] for name in names]
    # Besides the curves: the zero line, and the sign-flip marker when the in-graph form is drawn.
    extra = 1 if detach is True else 2
    assert len(ax.get_lines()) == len(names) + extra
    plt.close(fig)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_plot_curves_equal_the_package_weights(gamma):
    fig, ax = plt.subplots()
    lines = viz.plot_gradient_weights(ax, gamma=gamma, z_max=4.0, n_points=101)
    z = torch.as_tensor(lines["dpo"].get_xdata(), dtype=torch.float64)
    assert torch.allclose(z, torch.linspace(-4.0, 4.0, 101, dtype=torch.float64))
    expected = {
        "dpo": gradient_weight(z, gamma=0.0),
        "focalpo": gradient_weight(z, gamma=gamma),
        "focalpo_detached": gradient_weight(z, gamma=gamma, detach_weight=True),
    }
    for name, weight in expected.items():
        got = torch.as_tensor(lines[name].get_ydata(), dtype=torch.float64)
        assert torch.allclose(got, weight, atol=1e-12), name
    # The focal direction against its closed form: w = (1-p)^g [(1-p) - g p log p].
    p, log_p = torch.sigmoid(z), F.logsigmoid(z)
    focal = (1 - p) ** gamma * ((1 - p) - gamma * p * log_p)
    got = torch.as_tensor(lines["focal"].get_ydata(), dtype=torch.float64)
    assert torch.allclose(got, focal, atol=1e-10)
    plt.close(fig)


def test_plot_has_a_p_axis_on_top():
    fig, ax = plt.subplots()
    viz.plot_gradient_weights(ax, gamma=0.5)
    fig.canvas.draw()
    (top,) = [child for child in ax.child_axes if child.get_xlabel() == "p = σ(z)"]
    assert [tick.get_text() for tick in top.get_xticklabels()] == [f"{p:g}" for p in viz.P_TICKS]
    # Each p tick is drawn where the margin axis has z = logit(p).
    for p in viz.P_TICKS:
        z = math.log(p) - math.log1p(-p)
        on_top = top.transData.transform([[p, 0.0]])[0, 0]
        on_margin_axis = ax.transData.transform([[z, 0.0]])[0, 0]
        assert on_top == pytest.approx(on_margin_axis, abs=1e-6)
    plt.close(fig)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0, 2.0])
def test_sign_flip_margin_is_where_the_in_graph_weight_crosses_zero(gamma):
    flip = viz.sign_flip_margin(gamma=gamma)
    assert math.isclose(1 / (1 + math.exp(-flip)), math.exp(-1 / gamma), rel_tol=1e-12)
    assert math.isclose(viz.sign_flip_margin(gamma=gamma, beta=0.1), flip / 0.1, rel_tol=1e-12)
    eps = 1e-4
    below = gradient_weight(torch.tensor([flip - eps], dtype=torch.float64), gamma=gamma)
    above = gradient_weight(torch.tensor([flip + eps], dtype=torch.float64), gamma=gamma)
    assert below.item() < 0 < above.item()
    assert viz.sign_flip_margin(gamma=0.0) is None


def test_weight_share_is_the_share_of_absolute_weight():
    z = torch.linspace(-6.0, 6.0, 101, dtype=torch.float64)
    group = z < 1.0
    gamma = 2.0  # the in-graph weight is negative for p < e^(-1/2): absolute values matter
    p = torch.sigmoid(z)
    w = p**gamma * (1 - p) * (1 + gamma * torch.log(p))
    assert (w < 0).any()
    expected = (w.abs()[group].sum() / w.abs().sum()).item()
    assert math.isclose(viz.weight_share(w, group), expected, rel_tol=1e-12)
    assert math.isclose(viz.weight_share(w, ~group), 1 - expected, rel_tol=1e-12)


@pytest.mark.parametrize(
    ("weight", "group", "error", "match"),
    [
        (torch.ones(4), torch.ones(4), TypeError, "group"),
        (torch.ones(4), torch.ones(3, dtype=torch.bool), ValueError, "group"),
        (torch.zeros(4), torch.ones(4, dtype=torch.bool), ValueError, "weight"),
        (torch.ones(4, dtype=torch.long), torch.ones(4, dtype=torch.bool), TypeError, "weight"),
    ],
)
def test_weight_share_rejects_bad_arguments(weight, group, error, match):
    with pytest.raises(error, match=match):
        viz.weight_share(weight, group)


def test_weight_share_bars_are_the_shares_with_a_legend():
    margins, ref_misranked = _margins()
    z = margins[10]
    fig, ax = plt.subplots()
    shares = viz.plot_weight_shares(ax, z, ref_misranked, gamma=0.5)
    assert list(shares) == ["dpo", "focalpo", "focalpo_detached", "focal"]
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == pytest.approx([100 * s for s in shares.values()], rel=1e-12)
    w_dpo = 1 - torch.sigmoid(z)
    assert shares["dpo"] == pytest.approx((w_dpo[ref_misranked].sum() / w_dpo.sum()).item())
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "their share of the pairs" in legend
    assert all(viz.SHORT_LABELS[name] in legend for name in shares)
    plt.close(fig)


def test_margin_histogram_shows_every_pair_once_in_percent():
    margins, ref_misranked = _margins()
    fig, ax = plt.subplots()
    viz.plot_margin_histogram(ax, margins[10] * 10, ref_misranked)  # most beyond z_max: clipped
    heights = [patch.get_height() for patch in ax.patches]
    # Stacked: the patches of both groups together hold every pair.
    assert sum(heights) == pytest.approx(100.0)
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["reference ranks correctly (c ≤ 0)", "reference misranks (c > 0)"]
    plt.close(fig)


def test_live_explorer_has_gamma_step_and_form_controls():
    margins, ref_misranked = _margins()
    box = viz.gamma_explorer(margins, ref_misranked, gamma=1.0)
    controls = [w for w in box.children[1].children] + [box.children[2]]
    assert [c.description for c in controls] == ["γ", "step", "FocalPO p^γ"]
    assert list(controls[1].options) == list(STEPS)
    assert isinstance(box.children[-1], widgets.Output)
    with pytest.raises(ValueError, match="gamma"):
        viz.gamma_explorer(margins, ref_misranked, gamma=-1.0)


def test_the_default_gamma_grid_moves_the_picture_gradually():
    """One notch of the default grid changes each loss's share by a few points at most, and the
    grid brackets 1/ln 2, where the in-graph weight at p = 1/2 turns negative."""
    gammas = viz.EXPLORER_GAMMAS
    assert list(gammas) == sorted(set(gammas)) and gammas[0] == 0.0
    assert min(gammas) < 1 / math.log(2) < max(gammas)
    margins, ref_misranked = _margins()
    shares = [
        {
            n: viz.weight_share(w, ref_misranked)
            for n, w in viz.loss_weights(margins[10], gamma=g).items()
        }
        for g in gammas
    ]
    for name in ("focalpo_detached", "focal"):
        steps = [abs(b[name] - a[name]) for a, b in itertools.pairwise(shares)]
        assert 0 < max(steps) < 0.06, (name, steps)


def test_margins_from_must_be_text():
    margins, ref_misranked = _margins()
    with pytest.raises(TypeError, match="margins_from"):
        viz.explorer_figure(
            gamma=0.5, z=margins[10], ref_misranked=ref_misranked, step=10, margins_from=3
        )
    with pytest.raises(TypeError, match="margins_from"):
        viz.explorer_frame_alt(
            0.5, step=10, z=margins[10], ref_misranked=ref_misranked, margins_from=3
        )
