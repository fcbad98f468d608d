"""Every page of the built book as a reader's browser sees it: offline, rendered, linked, titled."""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from book_site import HTML, ROOT, is_local, source_path, toc_docnames

DOCNAMES = toc_docnames()
# A notebook output image gets its file path as alt text unless the cell sets one: no description.
_PATH_LIKE_ALT = re.compile(r"^\S*\.(png|jpe?g|gif|svg|webp)$", re.IGNORECASE)
_RAW_MATH = ("$$", "\\(", "\\)", "\\[", "\\]", "\\begin{")


def _visit(visits, docname):
    visit = visits[docname]
    assert visit.data, f"{docname}: listed in _toc.yml but {HTML / docname}.html was not built"
    return visit


def test_toc_lists_pages_that_exist(docnames):
    missing = [name for name in docnames if source_path(name) is None]
    assert not missing, f"_toc.yml lists pages with no source file: {missing}"
    assert len(docnames) >= 2, f"_toc.yml lists only {docnames}: the book has no chapters"


@pytest.mark.parametrize("docname", DOCNAMES)
def test_no_console_errors_or_failed_requests(visits, docname):
    visit = _visit(visits, docname)
    assert not visit.blocked_requests, f"{docname} requests off localhost: {visit.blocked_requests}"
    assert not visit.failed_requests, f"{docname} has failed requests: {visit.failed_requests}"
    assert not visit.console_errors, f"{docname} logs console errors: {visit.console_errors}"


@pytest.mark.parametrize("docname", DOCNAMES)
def test_math_is_rendered(visits, docname):
    data = _visit(visits, docname).data
    assert data["mathRendered"] >= data["mathSources"], (
        f"{docname}: {data['mathSources']} math elements, {data['mathRendered']} typeset"
    )
    assert not data["mathErrors"], f"{docname}: MathJax errors {data['mathErrors']}"
    raw = [token for token in _RAW_MATH if token in data["text"]]
    assert not raw, f"{docname}: raw TeX delimiters visible in the text: {raw}"


@pytest.mark.parametrize("docname", DOCNAMES)
def test_images_load_and_are_described(visits, docname):
    images = _visit(visits, docname).data["images"]
    broken = [image["src"] for image in images if not image["loaded"] and not image["inWidget"]]
    assert not broken, f"{docname}: images that did not load: {broken}"
    undescribed = [
        image["src"]
        for image in images
        if image["inArticle"]
        and not image["caption"]
        and (not image["alt"] or _PATH_LIKE_ALT.match(image["alt"]))
    ]
    assert not undescribed, (
        f"{docname}: figures without alt text or caption: {undescribed}. In a notebook give"
        ' the cell metadata {"mystnb": {"image": {"alt": "..."}}}'
        ' or {"mystnb": {"figure": {"caption": "..."}}}.'
    )


@cache
def _anchors(path: Path) -> frozenset[str]:
    html = path.read_text(encoding="utf-8", errors="replace")
    return frozenset(re.findall(r"""\s(?:id|name)=["']([^"']+)["']""", html))


@pytest.mark.parametrize("docname", DOCNAMES)
def test_internal_links_resolve(visits, server, docname):
    data = _visit(visits, docname).data
    assert data["links"], f"{docname}: no links at all, the page did not render"
    broken = []
    for link in data["links"]:
        parts = urlsplit(link["url"])
        if parts.scheme not in ("http", "https") or not is_local(link["url"]):
            continue
        target = HTML / unquote(parts.path.lstrip("/"))
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            broken.append(f"{link['href']} (no file {target.relative_to(HTML)})")
        elif parts.fragment and target.suffix == ".html":
            if unquote(parts.fragment) not in _anchors(target):
                broken.append(f"{link['href']} (no anchor #{parts.fragment})")
    assert not broken, f"{docname}: internal links that do not resolve: {broken}"


def test_page_titles_are_unique(visits, docnames):
    titles = {}
    for docname in docnames:
        title = _visit(visits, docname).data["title"].strip()
        assert title, f"{docname} has an empty <title>"
        titles.setdefault(title, []).append(docname)
    repeated = {title: names for title, names in titles.items() if len(names) > 1}
    assert not repeated, f"pages share a title: {repeated}"


def _repository() -> tuple[str, str, str]:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)/?", config["url"])
    assert match, f"_config.yml repository.url is not a GitHub URL: {config['url']}"
    return match[1], match[2], config.get("branch", "main")


NOTEBOOKS = [name for name in DOCNAMES if (ROOT / f"{name}.ipynb").is_file()]


def test_the_book_has_notebook_chapters():
    assert NOTEBOOKS, "_toc.yml lists no .ipynb chapter: there is no Colab launch button to test"


@pytest.mark.parametrize("docname", NOTEBOOKS)
def test_colab_button_opens_this_notebook(visits, docname):
    owner, repo, branch = _repository()
    colab = [
        link["url"]
        for link in _visit(visits, docname).data["links"]
        if link["url"].startswith("https://colab.research.google.com/")
    ]
    assert colab, f"{docname}: no Colab launch button"
    pattern = re.compile(
        r"https://colab\.research\.google\.com/github/"
        r"(?P<owner>[^/]+)/(?P<repo>[^/]+)/blob/(?P<branch>[^/]+)/(?P<path>.+\.ipynb)"
    )
    for url in colab:
        match = pattern.fullmatch(url)
        assert match, f"{docname}: Colab link is not a GitHub notebook URL: {url}"
        assert (match["owner"], match["repo"], match["branch"]) == (owner, repo, branch), (
            f"{docname}: Colab link {url} does not match _config.yml ({owner}/{repo}@{branch})"
        )
        assert match["path"] == f"{docname}.ipynb", f"{docname}: Colab link opens {match['path']}"
        assert (ROOT / match["path"]).is_file(), f"{docname}: no {match['path']} in the repository"


def _link_lister():
    spec = importlib.util.spec_from_file_location(
        "list_external_links",
        Path(__file__).resolve().parents[2] / "scripts" / "list_external_links.py",
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_link_lister_finds_what_the_browser_sees(visits, docnames):
    """scripts/list_external_links.py (an HTML parser) agrees with the links the browser found."""
    listed = {
        (page, target)
        for page, target, _, in_article in _link_lister().external_links(HTML, docnames)
        if in_article
    }
    seen = {
        (docname, link["href"])
        for docname in docnames
        for link in _visit(visits, docname).data["links"]
        if link["inArticle"] and urlsplit(link["href"]).scheme in ("http", "https")
    }
    assert seen, "no external link in the whole book: the comparison would be vacuous"
    assert listed == seen, f"only listed: {listed - seen}; only seen: {seen - listed}"
