"""The γ explorer works in the static book: moving γ by keyboard and by mouse changes the figure.

No kernel runs: the slider and the stack of precomputed frames are linked in the browser (jslink),
from the widget state myst-nb embedded at build time. Screenshots go to `_build/screenshots/`.
"""

from __future__ import annotations

import io
import re
import time

from book_site import EXPLORER_PAGE, SCREENSHOTS, PageVisit, open_page, toc_docnames
from PIL import Image, ImageChops


def _state(slider, output) -> dict:
    """The displayed γ (readout), the frame's src and pixels, and a screenshot of the output."""
    readout = slider.locator(".widget-readout")
    if readout.count():
        gamma = readout.first.inner_text().strip()
    else:
        gamma = slider.locator(".noUi-handle").first.get_attribute("aria-valuenow") or ""
    frame = output.locator("img.focalpo-explorer-frame:visible").first
    frame.wait_for(state="visible", timeout=10_000)
    assert frame.evaluate("img => img.complete && img.naturalWidth > 0"), "γ frame did not load"
    return {
        "gamma": gamma,
        "src": frame.get_attribute("src"),
        "pixels": Image.open(io.BytesIO(frame.screenshot())).convert("RGB"),
        "screenshot": output.screenshot(),
    }


def _wait_for_new_frame(slider, output, before: dict) -> dict:
    deadline = time.monotonic() + 10
    while True:
        now = _state(slider, output)
        if now["src"] != before["src"] or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def _save(state: dict, how: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    gamma = re.sub(r"[^0-9A-Za-z.\-]+", "_", state["gamma"])
    (SCREENSHOTS / f"gamma_explorer_{how}_gamma_{gamma}.png").write_bytes(state["screenshot"])


def _assert_changed(before: dict, after: dict, how: str) -> None:
    assert after["gamma"] != before["gamma"], f"{how}: γ readout stayed at {before['gamma']}"
    assert after["src"] != before["src"], f"{how}: γ is {after['gamma']} but the frame is unchanged"
    assert before["pixels"].size == after["pixels"].size and (
        ImageChops.difference(before["pixels"], after["pixels"]).getbbox() is not None
    ), f"{how}: the figure's pixels did not change (γ {before['gamma']} → {after['gamma']})"


def test_gamma_explorer_changes_the_figure(browser, server):
    assert EXPLORER_PAGE in toc_docnames(), (
        f"the γ explorer page {EXPLORER_PAGE} is not in _toc.yml (issue #6 adds it)"
    )
    visit = PageVisit(docname=EXPLORER_PAGE, url=f"{server}{EXPLORER_PAGE}.html")
    page = open_page(browser, visit.url, visit)
    slider = page.locator(".widget-slider").filter(
        has=page.locator(".widget-label", has_text=re.compile("γ|gamma", re.IGNORECASE))
    )
    assert slider.count() >= 1, f"{EXPLORER_PAGE}: no slider labelled γ (widget state missing?)"
    slider = slider.first
    output = page.locator("div.cell_output").filter(has=slider).first
    assert output.locator("img.focalpo-explorer-frame:visible").count() == 1, (
        f"{EXPLORER_PAGE}: expected exactly one displayed frame next to the γ slider"
    )

    start = _state(slider, output)
    _save(start, "start")

    handle = slider.locator(".noUi-handle").first
    handle.focus()
    handle.press("ArrowRight")
    by_keyboard = _wait_for_new_frame(slider, output, start)
    _assert_changed(start, by_keyboard, "keyboard (ArrowRight)")
    _save(by_keyboard, "keyboard")

    track = slider.locator(".noUi-base").first.bounding_box()
    handle_box = handle.bounding_box()
    handle_x = handle_box["x"] + handle_box["width"] / 2
    # Click the end of the track farther from the handle: the slider jumps to the first or last γ.
    left_half = handle_x < track["x"] + track["width"] / 2
    target_x = track["x"] + track["width"] - 2 if left_half else track["x"] + 2
    page.mouse.click(target_x, track["y"] + track["height"] / 2)
    by_mouse = _wait_for_new_frame(slider, output, by_keyboard)
    _assert_changed(by_keyboard, by_mouse, "mouse (click on the track)")
    _save(by_mouse, "mouse")

    page.context.close()
    assert not visit.blocked_requests, f"requests outside localhost: {visit.blocked_requests}"
    assert not visit.failed_requests, f"failed requests: {visit.failed_requests}"
    assert not visit.console_errors, f"console errors: {visit.console_errors}"
