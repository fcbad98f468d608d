"""The book's configuration agrees with itself: TOC, the notebooks' Colab cells and _config.yml."""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
NOTEBOOKS = sorted((ROOT / "book").rglob("*.ipynb"))
INSTALL = re.compile(r"%pip install .*?git\+(?P<url>https://[^@\"' ]+)@(?P<branch>[\w./-]+)")


def _toc_files(node) -> list[str]:
    files = []
    if isinstance(node, dict):
        if "file" in node:
            files.append(node["file"])
        if "root" in node:
            files.append(node["root"])
        for value in node.values():
            files += _toc_files(value)
    elif isinstance(node, list):
        for item in node:
            files += _toc_files(item)
    return files


def _resolve(entry: str) -> Path | None:
    for suffix in ("", ".md", ".ipynb"):
        path = ROOT / f"{entry}{suffix}"
        if path.is_file():
            return path
    return None


def test_toc_lists_only_pages_that_exist():
    entries = _toc_files(TOC)
    assert entries, "_toc.yml lists no pages"
    missing = [entry for entry in entries if _resolve(entry) is None]
    assert not missing, f"_toc.yml lists pages that do not exist: {missing}"


def test_every_notebook_is_in_the_toc():
    listed = {_resolve(entry) for entry in _toc_files(TOC)}
    orphans = [str(nb.relative_to(ROOT)) for nb in NOTEBOOKS if nb not in listed]
    assert not orphans, f"notebooks missing from _toc.yml: {orphans}"


def test_repository_settings_for_colab():
    """One ref for everything a reader gets: the launch buttons open the notebooks from
    ``repository.branch``, and the install cells install from it too (next test). No second
    ref, such as a release tag, that would have to be published by hand to match."""
    repo = CONFIG["repository"]
    assert repo["url"].startswith("https://github.com/")
    assert isinstance(repo["branch"], str) and repo["branch"]
    assert set(repo) == {"url", "branch", "path_to_book"}, "one ref only: repository.branch"
    assert repo.get("path_to_book", "") == "", "path_to_book must stay empty (Colab links break)"
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_setup_cell_installs_from_the_configured_repository(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    installs = [
        m
        for cell in cells
        if cell["cell_type"] == "code"
        for m in INSTALL.finditer("".join(cell["source"]))
    ]
    assert installs, f"{notebook.name} has no Colab setup cell that installs the package"
    for match in installs:
        assert match["url"] == CONFIG["repository"]["url"], f"{notebook.name}: {match['url']}"
        assert match["branch"] == CONFIG["repository"]["branch"], (
            f"{notebook.name}: {match['branch']}"
        )


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(notebook):
    """Every output the book shows is computed when the book is built, never stored by hand."""
    cells = json.loads(notebook.read_text())["cells"]
    stale = [i for i, cell in enumerate(cells) if cell["cell_type"] == "code" and cell["outputs"]]
    assert not stale, f"{notebook.name} has stored outputs in cells {stale}"


def test_glue_prints_where_myst_nb_is_absent(monkeypatch, capsys):
    """Colab has no myst-nb: the chapters' glue shows the value instead of failing."""
    from focalpo_mini.notebook import glue

    monkeypatch.setitem(__import__("sys").modules, "myst_nb", None)  # absent, as on Colab
    glue("loss_kept", 0.707, display=False)
    assert capsys.readouterr().out == "loss_kept = 0.707\n"
    with pytest.raises(TypeError, match="name"):
        glue("", 1)
    with pytest.raises(TypeError, match="display"):
        glue("x", 1, display="no")
