"""The gradient-weight plot draws the package's weights, and the static gamma explorer is a
Stack of distinct frames that a slider drives through a browser-side link."""

from __future__ import annotations

import base64
import html
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


@pytest.fixture(scope="module")
def explorer() -> widgets.VBox:
    return viz.gamma_explorer_static(GAMMAS, dpi=40)


def _child(box: widgets.VBox, kind: type) -> widgets.Widget:
    (found,) = [child for child in box.children if isinstance(child, kind)]
    return found


def _frames(explorer) -> list[tuple[bytes, str]]:
    """Each frame's PNG bytes and alt text, read back from its HTML."""
    frames = []
    for child in _child(explorer, widgets.Stack).children:
        assert isinstance(child, widgets.HTML)
        (img,) = re.findall(r"<img [^>]*>", child.value)
        data = re.search(r'src="data:image/png;base64,([^"]+)"', img).group(1)
        frames.append((base64.b64decode(data), html.unescape(re.search(r'alt="([^"]*)"', img)[1])))
    return frames


def test_static_explorer_has_one_described_png_per_gamma(explorer):
    frames = _frames(explorer)
    assert len(frames) == len(GAMMAS)
    assert all(png[:4] == b"\x89PNG" for png, _ in frames)
    for gamma, (_, alt) in zip(GAMMAS, frames, strict=True):
        assert alt == viz.explorer_frame_alt(gamma, beta=0.1)
        assert f"γ = {gamma:g}" in alt


def test_frame_alt_text_states_the_sign_flip():
    assert "0.135" in viz.explorer_frame_alt(0.5, beta=0.1)  # e^-2
    margin = math.log(math.exp(-0.5) / (1 - math.exp(-0.5))) / 0.1  # gamma = 2: logit(e^-1/2)/beta
    assert f"{margin:.3g} nats" in viz.explorer_frame_alt(2.0, beta=0.1)
    assert "coincide" in viz.explorer_frame_alt(0.0, beta=0.1)


def test_static_explorer_frames_differ_between_gammas(explorer):
    assert len({png for png, _ in _frames(explorer)}) == len(GAMMAS)


def test_static_explorer_slider_is_linked_to_the_stack(explorer):
    slider = _child(explorer, widgets.SelectionSlider)
    stack = _child(explorer, widgets.Stack)
    assert [value for _, value in slider.options] == list(GAMMAS)
    assert slider.description == "γ"
    links = [
        w
        for w in widgets.Widget.widgets.values()
        if isinstance(w, Link)
        and w.source == (slider, "index")
        and w.target == (stack, "selected_index")
    ]
    assert len(links) == 1
    assert stack.selected_index == slider.index == 0


def test_static_explorer_rejects_a_single_gamma():
    with pytest.raises(ValueError, match="gammas"):
        viz.gamma_explorer_static([0.5])


@pytest.mark.parametrize(("detach", "names"), [
    (None, ["dpo", "focalpo", "focalpo_detached", "focal"]),
    (False, ["dpo", "focalpo", "focal"]),
    (True, ["dpo", "focalpo_detached", "focal"]),
])  # fmt: skip
def test_plot_draws_one_labelled_line_per_loss(detach, names):
    fig, ax = plt.subplots()
    lines = viz.plot_gradient_weights(ax, gamma=0.5, beta=0.1, detach=detach)
    assert list(lines) == names
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == [viz.WEIGHT_LABELS[name] for name in names]
    # Besides the curves: the zero line, and the sign-flip marker when the in-graph form is drawn.
    extra = 1 if detach is True else 2
    assert len(ax.get_lines()) == len(names) + extra
    plt.close(fig)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_plot_curves_equal_the_package_weights(gamma):
    beta = 0.2
    fig, ax = plt.subplots()
    lines = viz.plot_gradient_weights(ax, gamma=gamma, beta=beta, h_max=40.0, n_points=101)
    h = torch.as_tensor(lines["dpo"].get_xdata(), dtype=torch.float64)
    assert torch.allclose(h, torch.linspace(-40.0, 40.0, 101, dtype=torch.float64))
    z = beta * h
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


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0, 2.0])
def test_sign_flip_margin_is_where_the_in_graph_weight_crosses_zero(gamma):
    beta = 0.1
    flip = viz.sign_flip_margin(gamma=gamma, beta=beta)
    assert math.isclose(1 / (1 + math.exp(-beta * flip)), math.exp(-1 / gamma), rel_tol=1e-12)
    eps = 1e-3
    below = gradient_weight(torch.tensor([beta * (flip - eps)], dtype=torch.float64), gamma=gamma)
    above = gradient_weight(torch.tensor([beta * (flip + eps)], dtype=torch.float64), gamma=gamma)
    assert below.item() < 0 < above.item()
    assert viz.sign_flip_margin(gamma=0.0, beta=beta) is None


def test_weight_split_adds_up_to_the_mean_weight():
    z = 0.1 * viz.reference_margins(n=1000)
    w = gradient_weight(z, gamma=0.5)
    misranked, correct = viz.weight_split(w, z)
    assert math.isclose(misranked + correct, w.mean().item(), rel_tol=1e-12)
    assert math.isclose(misranked, w[z < 0].sum().item() / len(z), rel_tol=1e-12)


def test_reference_margins_are_normal_quantiles():
    h = viz.reference_margins(mean=5.0, std=20.0, n=4001)
    assert torch.all(h[1:] > h[:-1])
    assert math.isclose(h.mean().item(), 5.0, abs_tol=1e-9)
    assert math.isclose(h.median().item(), 5.0, abs_tol=1e-9)
    assert math.isclose(h.std().item(), 20.0, rel_tol=5e-3)


def test_live_explorer_has_gamma_beta_and_form_controls():
    box = viz.gamma_explorer(gamma=1.0, beta=0.2)
    controls = [w for w in box.children[1].children] + [box.children[2]]
    assert [c.description for c in controls] == ["γ", "β", "FocalPO p^γ"]
    assert isinstance(box.children[-1], widgets.Output)
    with pytest.raises(ValueError, match="gamma"):
        viz.gamma_explorer(gamma=-1.0)
