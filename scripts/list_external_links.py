"""List every external link in the built book, page by page, without fetching any of them.

CI cannot reach the internet, so nothing checks these links automatically; this prints them for a
reviewer to read at once. Run after `make book`:

    .venv/bin/python scripts/list_external_links.py            # links in the pages' text
    .venv/bin/python scripts/list_external_links.py --chrome   # also the theme's header and footer

Output: one tab-separated line per link (page, target, link text), pages in `_toc.yml` order, then
a count. Links in the theme's chrome (repository, Colab, footer) repeat on every page, so without
`--chrome` they are summarised once at the end.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent


class _LinkParser(HTMLParser):
    """Collects (target, text, in_article) for every external href/src in one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str, bool]] = []
        self._article_depth = 0
        self._open: list[list] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "article":
            self._article_depth += 1
        target = attributes.get("href") if tag in ("a", "link") else attributes.get("src")
        if target and urlsplit(target).scheme in ("http", "https"):
            link = [target, attributes.get("alt") or "", self._article_depth > 0]
            self.links.append(link)
            if tag == "a":
                self._open.append(link)

    def handle_endtag(self, tag: str) -> None:
        if tag == "article":
            self._article_depth -= 1
        elif tag == "a" and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for link in self._open:
            link[1] += data


def toc_pages(root: Path) -> list[str]:
    """Documents listed in `_toc.yml`, root first, in reading order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(entries) -> None:
        for entry in entries or []:
            if "file" in entry:
                pages.append(entry["file"])
            for key in ("parts", "chapters", "sections"):
                walk(entry.get(key))

    walk([{key: toc.get(key) for key in ("parts", "chapters", "sections")}])
    return [page.removesuffix(".ipynb").removesuffix(".md") for page in pages]


def external_links(html_dir: Path, pages: list[str]) -> list[tuple[str, str, str, bool]]:
    """(page, target, text, in_article) for every external link of each built page."""
    found = []
    for page in pages:
        path = html_dir / f"{page}.html"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: build the book first (`make book`)")
        parser = _LinkParser()
        parser.feed(path.read_text(encoding="utf-8"))
        for target, text, in_article in parser.links:
            found.append((page, target, " ".join(text.split()), in_article))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="book root (holds _toc.yml)")
    parser.add_argument("--chrome", action="store_true", help="list the theme's links per page")
    args = parser.parse_args(argv)
    links = external_links(args.root / "_build" / "html", toc_pages(args.root))
    shown = [link for link in links if link[3] or args.chrome]
    for page, target, text, _ in shown:
        print(f"{page}\t{target}\t{text}")
    print(f"# {len(shown)} external links ({len({t for _, t, _, _ in shown})} distinct targets)")
    if not args.chrome:
        chrome = Counter(target for _, target, _, in_article in links if not in_article)
        for target, count in sorted(chrome.items()):
            print(f"# theme link on {count} page(s): {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
