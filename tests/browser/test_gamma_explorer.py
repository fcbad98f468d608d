"""The γ explorer works in the static book: moving γ, and moving the training step, by keyboard and
by mouse, each change the figure, every frame shown has alt text that says what it shows, and the γ
slider carries the whole grid of `focalpo_mini.viz.EXPLORER_GAMMAS`.

No kernel runs: the two sliders and the stacks of precomputed frames are linked in the browser
(jslink), from the widget state myst-nb embedded at build time. Screenshots go to
`_build/screenshots/`.
"""

from __future__ import annotations

import io
import re
import time

from book_site import EXPLORER_PAGE, SCREENSHOTS, PageVisit, open_page, toc_docnames
from PIL import Image, ImageChops

from focalpo_mini.viz import EXPLORER_GAMMAS

FRAME = "img.focalpo-explorer-frame:visible"


def _readout(slider) -> str:
    readout = slider.locator(".widget-readout")
    if readout.count():
        return readout.first.inner_text().strip()
    return slider.locator(".noUi-handle").first.get_attribute("aria-valuenow") or ""


def _state(sliders: dict, output) -> dict:
    """Both readouts, the displayed frame's src, alt text and pixels, and a screenshot."""
    frame = output.locator(FRAME).first
    frame.wait_for(state="visible", timeout=10_000)
    assert output.locator(FRAME).count() == 1, "expected exactly one displayed frame"
    assert frame.evaluate("img => img.complete && img.naturalWidth > 0"), "frame did not load"
    return {
        **{name: _readout(slider) for name, slider in sliders.items()},
        "src": frame.get_attribute("src"),
        "alt": (frame.get_attribute("alt") or "").strip(),
        "pixels": Image.open(io.BytesIO(frame.screenshot())).convert("RGB"),
        "screenshot": output.screenshot(),
    }


def _wait_for_new_frame(sliders, output, before: dict) -> dict:
    deadline = time.monotonic() + 10
    while True:
        now = _state(sliders, output)
        if now["src"] != before["src"] or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def _save(state: dict, how: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    label = re.sub(
        r"[^0-9A-Za-z.\-]+", "_", f"gamma_{state['γ']}_step_{state['step']}", flags=re.ASCII
    )
    (SCREENSHOTS / f"gamma_explorer_{how}_{label}.png").write_bytes(state["screenshot"])


def _assert_described(state: dict) -> None:
    """The frame's alt text names the γ and the step that the readouts show."""
    assert state["alt"], "the displayed frame has no alt text"
    expected = f"γ = {state['γ']}, training step {state['step']}."
    assert state["alt"].startswith(expected), (
        f"alt text {state['alt'][:80]!r}… does not start with {expected!r}"
    )


def _assert_changed(before: dict, after: dict, moved: str, how: str) -> None:
    still = "step" if moved == "γ" else "γ"
    assert after[moved] != before[moved], f"{how}: the {moved} readout stayed at {before[moved]}"
    assert after[still] == before[still], f"{how}: moving {moved} also changed {still}"
    assert after["src"] != before["src"], (
        f"{how}: {moved} is {after[moved]} but the frame is unchanged"
    )
    assert after["alt"] != before["alt"], f"{how}: the frame changed but its alt text did not"
    assert before["pixels"].size == after["pixels"].size and (
        ImageChops.difference(before["pixels"], after["pixels"]).getbbox() is not None
    ), f"{how}: the figure's pixels did not change ({moved} {before[moved]} → {after[moved]})"
    _assert_described(after)


def _press(slider, key: str) -> None:
    handle = slider.locator(".noUi-handle").first
    handle.focus()
    handle.press(key)


def _click_far_end(page, slider) -> None:
    """Click the end of the track farther from the handle: the slider jumps to its first or last
    value."""
    track = slider.locator(".noUi-base").first.bounding_box()
    handle_box = slider.locator(".noUi-handle").first.bounding_box()
    handle_x = handle_box["x"] + handle_box["width"] / 2
    left_half = handle_x < track["x"] + track["width"] / 2
    target_x = track["x"] + track["width"] - 2 if left_half else track["x"] + 2
    page.mouse.click(target_x, track["y"] + track["height"] / 2)


def _slider(page, within, label: re.Pattern):
    """The slider inside ``within`` whose label matches ``label``. (The inner locator of a filter
    is matched inside each slider, so it is built from the page, not from ``within``.)"""
    return within.locator(".widget-slider").filter(
        has=page.locator(".widget-label", has_text=label)
    )


def test_gamma_explorer_changes_the_figure(browser, server):
    assert EXPLORER_PAGE in toc_docnames(), (
        f"the γ explorer page {EXPLORER_PAGE} is not in _toc.yml"
    )
    visit = PageVisit(docname=EXPLORER_PAGE, url=f"{server}{EXPLORER_PAGE}.html")
    page = open_page(browser, visit.url, visit)
    explorer = page.locator(".focalpo-gamma-explorer")
    assert explorer.count() == 1, f"{EXPLORER_PAGE}: no γ explorer (widget state missing?)"
    output = page.locator("div.cell_output").filter(has=explorer).first
    sliders = {
        "γ": _slider(page, output, re.compile(r"^\s*(γ|gamma)\s*$", re.IGNORECASE)),
        "step": _slider(page, output, re.compile(r"^\s*step\s*$", re.IGNORECASE)),
    }
    for name, slider in sliders.items():
        assert slider.count() == 1, f"{EXPLORER_PAGE}: expected one slider labelled {name}"

    start = _state(sliders, output)
    _assert_described(start)
    assert start["γ"] == f"{EXPLORER_GAMMAS[0]:g}", f"γ starts at {start['γ']}"
    _save(start, "start")
    states = [start]

    for moved, tag, how, act in (
        (
            "γ",
            "gamma_keyboard",
            "γ by keyboard (ArrowRight)",
            lambda: _press(sliders["γ"], "ArrowRight"),
        ),
        (
            "step",
            "step_keyboard",
            "step by keyboard (ArrowRight)",
            lambda: _press(sliders["step"], "ArrowRight"),
        ),
        (
            "γ",
            "gamma_mouse",
            "γ by mouse (click on the track)",
            lambda: _click_far_end(page, sliders["γ"]),
        ),
        (
            "step",
            "step_mouse",
            "step by mouse (click on the track)",
            lambda: _click_far_end(page, sliders["step"]),
        ),
    ):
        act()
        after = _wait_for_new_frame(sliders, output, states[-1])
        _assert_changed(states[-1], after, moved, how)
        _save(after, tag)
        states.append(after)
    assert len({state["src"] for state in states}) == len(states), "a frame was shown twice"
    # The page carries the book's whole γ grid: one key press is one notch, a click on the far end
    # of the track reaches its last value.
    assert states[1]["γ"] == f"{EXPLORER_GAMMAS[1]:g}", f"one notch took γ to {states[1]['γ']}"
    assert states[3]["γ"] == f"{EXPLORER_GAMMAS[-1]:g}", f"the far end of γ is {states[3]['γ']}"

    page.context.close()
    assert not visit.blocked_requests, f"requests outside localhost: {visit.blocked_requests}"
    assert not visit.failed_requests, f"failed requests: {visit.failed_requests}"
    assert not visit.console_errors, f"console errors: {visit.console_errors}"
