"""No stray warning or stderr line on any page of the built book (run after `make book`).

myst-nb renders a cell's stderr stream as an output element with the class ``stderr`` and an
exception as one with the class ``traceback``; a warning that reaches stdout shows as a line such
as ``file.py:3: UserWarning: ...`` in a stream output. Each one is a defect to fix where it comes
from (the library call, the argument, the version), so no page may show one, in visible or in
collapsed cells. Hiding them is not a fix either: no notebook may tag a cell ``remove-stderr``, and
the book's configuration may not drop stderr outputs.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from book_site import HTML, ROOT, toc_docnames
from bs4 import BeautifulSoup

DOCNAMES = toc_docnames()
STRAY_CLASSES = {"stderr", "traceback"}
# A warnings-module line ("path:12: FutureWarning: ..."), a logging line ("WARNING: ...",
# "WARNING:root:..."), or a traceback printed to stdout.
WARNING_LINE = re.compile(
    r"\b[A-Z]\w*Warning: |^\s*WARNING\b|^\[\w+\] WARNING\b|Traceback \(most recent call last\)"
)


def stray_outputs(html: str) -> list[str]:
    """Every stderr or traceback output of a myst-nb page, and every warning-like line in its
    other outputs, as short strings."""
    found = []
    for node in BeautifulSoup(html, "html.parser").select("div.output"):
        classes = set(node.get("class", []))
        text = node.get_text()
        if classes & STRAY_CLASSES:
            found.append(f"{'/'.join(sorted(classes & STRAY_CLASSES))}: {text.strip()[:300]}")
        else:
            found += [
                f"warning line: {line.strip()[:300]}"
                for line in text.splitlines()
                if WARNING_LINE.search(line)
            ]
    return found


def _page(docname: str) -> str:
    page = HTML / f"{docname}.html"
    if not page.is_file():
        pytest.fail(f"{page} not found: build the book first (`make book`)")
    return page.read_text(encoding="utf-8")


@pytest.mark.parametrize("docname", DOCNAMES)
def test_no_stray_warning_or_stderr_on_the_page(docname):
    stray = stray_outputs(_page(docname))
    assert not stray, f"{docname} shows stray output (fix it at its source):\n" + "\n".join(stray)


def test_the_check_reads_the_markup_myst_nb_writes():
    """The check relies on myst-nb's class names: if a release renamed them, every page would
    pass unseen. The built book must hold outputs under the names the check reads."""
    classes = set()
    for docname in DOCNAMES:
        for node in BeautifulSoup(_page(docname), "html.parser").select("div.cell_output div"):
            classes.update(node.get("class", []))
    assert {"output", "stream", "text_plain"} <= classes, sorted(classes)


def test_the_check_finds_stderr_warnings_and_tracebacks():
    def output(kind: str, text: str) -> str:
        return (
            f'<div class="cell_output docutils container"><div class="output {kind} '
            f'highlight-myst-ansi notranslate"><div class="highlight"><pre><span></span>{text}'
            "</pre></div></div></div>"
        )

    assert stray_outputs(output("stderr", "Failed to load a kernel\n"))
    assert stray_outputs(output("traceback", "ValueError: bad\n"))
    assert stray_outputs(output("stream", "x.py:3: FutureWarning: renamed\n  warnings.warn(\n"))
    assert stray_outputs(output("stream", "WARNING:root:careful\n"))
    # A chapter may print an error message on purpose, and words like "warning" in prose.
    assert not stray_outputs(output("stream", "ValueError: loss_type must be ['sigmoid']\n"))
    assert not stray_outputs(output("text_plain", "no warning here: 0.5\n"))


def test_no_notebook_hides_its_stderr():
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    stderr = (config.get("sphinx") or {}).get("config", {}).get("nb_output_stderr", "show")
    assert stderr in ("show", "warn", "error", "severe"), f"nb_output_stderr: {stderr}"
    tagged = []
    for notebook in sorted((ROOT / "book").rglob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        tagged += [
            f"{notebook.relative_to(ROOT)} cell {i}"
            for i, cell in enumerate(cells)
            if "remove-stderr" in cell.get("metadata", {}).get("tags", [])
        ]
    assert not tagged, f"cells that hide their stderr: {tagged}"
