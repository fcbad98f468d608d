"""Serve the built book on localhost and visit every page in `_toc.yml` with Debian's Chromium.

Run after the book build (`make test` does): `pytest tests/browser`. Each page is visited once
per session; the tests read what the visit recorded (see `book_site.py`).
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest
from book_site import CHROMIUM, HTML, PageVisit, QuietHandler, collect, open_page, toc_docnames


@pytest.fixture(scope="session")
def docnames() -> list[str]:
    names = toc_docnames()
    assert names, "_toc.yml lists no pages: nothing to test"
    return names


@pytest.fixture(scope="session")
def server() -> str:
    """Serve `_build/html` on an ephemeral localhost port; yields the base URL."""
    if not (HTML / "index.html").is_file():
        pytest.fail(f"{HTML / 'index.html'} not found: build the book first (`make book`)")
    handler = functools.partial(QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: `apt-get install -y chromium` (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def visits(browser, server, docnames) -> dict[str, PageVisit]:
    """Visit every page in the TOC once; map docname to what the visit recorded."""
    recorded = {}
    for docname in docnames:
        visit = PageVisit(docname=docname, url=f"{server}{docname}.html")
        if (HTML / f"{docname}.html").is_file():
            page = open_page(browser, visit.url, visit)
            visit.data = collect(page)
            page.context.close()
        recorded[docname] = visit
    return recorded
