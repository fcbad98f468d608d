"""What the browser tests share: where the book is, its table of contents, recorded page visits.

Every request that does not go to localhost is aborted and recorded, so a page that needs a CDN
fails. `BOOK_ROOT` selects another book to test (default: this repository).
"""

from __future__ import annotations

import http.server
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(os.environ.get("BOOK_ROOT", Path(__file__).resolve().parents[2])).resolve()
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
EXPLORER_PAGE = "book/part2/05_focalpo_gradients"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}

# Collected in the page, after MathJax has typeset it: everything the tests check.
COLLECT_JS = """
() => {
  const visibleText = (root) => {
    const clone = root.cloneNode(true);
    clone.querySelectorAll("pre, code, script, style, mjx-container, .highlight, textarea")
      .forEach((node) => node.remove());
    return clone.textContent;
  };
  const article = document.querySelector("article") || document.body;
  const captionOf = (img) => {
    const figure = img.closest("figure");
    const caption = figure && figure.querySelector("figcaption");
    return caption ? caption.textContent.trim() : "";
  };
  return {
    title: document.title,
    mathSources: document.querySelectorAll("span.math, div.math").length,
    mathRendered: document.querySelectorAll("mjx-container").length,
    mathErrors: Array.from(document.querySelectorAll("mjx-merror"))
      .map((e) => e.getAttribute("data-mjx-error") || e.textContent),
    text: visibleText(article),
    images: Array.from(document.querySelectorAll("img")).map((img) => ({
      src: img.getAttribute("src"),
      loaded: img.complete && img.naturalWidth > 0,
      alt: (img.getAttribute("alt") || "").trim(),
      caption: captionOf(img),
      inArticle: article.contains(img),
      inWidget: img.closest(".jupyter-widgets") !== null,
    })),
    links: Array.from(document.querySelectorAll("a[href]")).map((a) => ({
      href: a.getAttribute("href"),
      url: a.href,
      inArticle: article.contains(a),
    })),
  };
}
"""


@dataclass
class PageVisit:
    """What one visit to a page recorded."""

    docname: str
    url: str
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    blocked_requests: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)


def toc_docnames(toc_path: Path = ROOT / "_toc.yml") -> list[str]:
    """Every document listed in a Jupyter Book `_toc.yml` (root first), in reading order."""
    toc = yaml.safe_load(toc_path.read_text())
    names = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                names.append(entry["file"])
            for key in ("parts", "chapters", "sections"):
                walk(entry.get(key))

    walk([{key: toc.get(key) for key in ("parts", "chapters", "sections")}])
    return [name.removesuffix(".ipynb").removesuffix(".md") for name in names]


def source_path(docname: str) -> Path | None:
    """The source file of a document: `.ipynb` or `.md` under the book root."""
    for suffix in (".ipynb", ".md"):
        path = ROOT / f"{docname}{suffix}"
        if path.is_file():
            return path
    return None


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob", "about") or parts.hostname in LOCAL_HOSTS


def open_page(browser, url: str, visit: PageVisit):
    """Open `url` in a new page; record its console errors and failed or blocked requests."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})

    def route(route):
        if is_local(route.request.url):
            route.continue_()
        else:
            visit.blocked_requests.append(route.request.url)
            route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on(
        "console",
        lambda message: (
            message.type == "error"
            and visit.console_errors.append(f"{message.text} ({message.location.get('url')})")
        ),
    )
    page.on("pageerror", lambda error: visit.console_errors.append(f"uncaught: {error}"))
    page.on(
        "requestfailed",
        lambda request: (
            is_local(request.url)
            and visit.failed_requests.append(f"{request.url}: {request.failure}")
        ),
    )
    page.on(
        "response",
        lambda response: (
            response.status >= 400
            and visit.failed_requests.append(f"{response.url}: HTTP {response.status}")
        ),
    )
    page.goto(url, wait_until="networkidle")
    page.evaluate(
        "async () => { if (window.MathJax && MathJax.startup && MathJax.startup.promise)"
        " { await MathJax.startup.promise; } }"
    )
    return page


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files without logging each request."""

    def log_message(self, format, *args):
        pass


def collect(page) -> dict:
    """Titles, math, images and links of a loaded page (see COLLECT_JS)."""
    return page.evaluate(COLLECT_JS)
