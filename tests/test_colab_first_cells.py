"""Every chapter's first cells, run as Colab runs them, in an environment without the book's
build tools.

One subprocess runs with a site-packages of its own: links to every installed package except
the book-build and test tools (and their metadata), so that for it they are not installed at
all. There, with ``google.colab`` stubbed in ``sys.modules``, it runs each chapter's setup cell
in IPython, where a ``%pip`` magic records its line (expanded as IPython expands it) instead of
installing, and then every top-level import statement of every code cell. The 7B chapter's
setup cell runs twice: without a GPU and with ``torch.cuda.is_available`` saying True. The test
checks that no chapter imports a build-only package and that every install line installs the
library from the repository and ref of ``_config.yml`` with the exact pins of
``requirements.txt``.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").rglob("*.ipynb"))
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
PINS = dict(
    line.split("==")
    for line in (ROOT / "requirements.txt").read_text().splitlines()
    if "==" in line and not line.startswith("#")
)
# Installed for building the book or running its tests, never on Colab: the distributions and
# import packages whose normalised names start with these.
BUILD_ONLY = (
    "myst_nb",
    "myst_parser",
    "jupyter_book",
    "jupyter_cache",
    "jupytext",
    "papermill",
    "sphinx",
    "pydata_sphinx_theme",
    "pybtex",
    "playwright",
    "pytest",
    "_pytest",
    "hypothesis",
    "_hypothesis",
)
# What every chapter's install pins: the packages whose behaviour the book depends on exactly.
ALWAYS_PINNED = {"transformers", "tokenizers", "datasets", "accelerate", "trl", "peft"}

RUNNER = textwrap.dedent(
    """
    import ast, importlib.machinery, json, sys, types

    for name in ("google", "google.colab"):  # what Colab's kernel has imported at start-up
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)

    from IPython.core.interactiveshell import InteractiveShell
    from IPython.core.inputtransformer2 import TransformerManager
    import torch

    shell = InteractiveShell.instance()
    recorded = []
    shell.register_magic_function(lambda line: recorded.append(line), "line", "pip")
    report = {}
    for path, cuda in json.loads(sys.stdin.read()):
        torch.cuda.is_available = lambda: cuda
        cells = [c for c in json.load(open(path))["cells"] if c["cell_type"] == "code"]
        shell.user_ns.clear()
        shell.init_user_ns()
        recorded.clear()
        setup = shell.run_cell("".join(cells[0]["source"]), store_history=False)
        failed = []
        for cell in cells:
            code = TransformerManager().transform_cell("".join(cell["source"]))
            for node in ast.parse(code).body:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    try:
                        exec(compile(ast.Module([node], []), path, "exec"), {})
                    except ImportError as error:
                        failed.append(f"{ast.unparse(node)}: {error}")
        report[f"{path}|{cuda}"] = {
            "setup_error": None if setup.success else repr(setup.error_in_exec),
            "pip": list(recorded),
            "failed_imports": failed,
        }
    print(json.dumps(report))
    """
)


def _is_build_only(entry: str) -> bool:
    return re.sub(r"[-.]", "_", entry.lower()).startswith(BUILD_ONLY)


@pytest.fixture(scope="module")
def colab_run(tmp_path_factory):
    site = tmp_path_factory.mktemp("site-packages")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not _is_build_only(entry.name) and not entry.name.endswith(".pth"):
            (site / entry.name).symlink_to(entry)
    assert not any(_is_build_only(e.name) for e in site.iterdir())
    runs = [(str(nb), False) for nb in NOTEBOOKS]
    runs += [(str(nb), True) for nb in NOTEBOOKS if nb.name.startswith("10_")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(site)]),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(  # -S: no site-packages but the filtered one
        [sys.executable, "-S", "-c", RUNNER],
        input=json.dumps(runs),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _runs(colab_run, notebook):
    return {key: value for key, value in colab_run.items() if key.startswith(f"{notebook}|")}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_no_chapter_needs_a_build_only_package(notebook, colab_run):
    for run in _runs(colab_run, notebook).values():
        assert run["setup_error"] is None, run["setup_error"]
        assert not run["failed_imports"], (
            f"{notebook.name} imports what Colab does not have: {run['failed_imports']}"
        )


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_every_install_line_is_the_configured_ref_with_exact_pins(notebook, colab_run):
    repository = CONFIG["repository"]
    library = f"focalpo_mini[trl] @ git+{repository['url']}@{repository['branch']}"
    for key, run in _runs(colab_run, notebook).items():
        assert len(run["pip"]) == 1, f"{key}: one %pip line expected, got {run['pip']}"
        words = shlex.split(run["pip"][0])
        assert words[0] == "install"
        requirements = [w for w in words[1:] if not w.startswith("-")]
        assert requirements[0] == library
        pinned = dict(r.split("==") for r in requirements[1:])
        assert len(pinned) == len(requirements) - 1, f"{key}: unpinned {requirements[1:]}"
        assert {name: PINS[name] for name in pinned} == pinned, key
        assert ALWAYS_PINNED <= set(pinned), f"{key}: {ALWAYS_PINNED - set(pinned)} not pinned"
        assert "torch" not in pinned  # Colab's own torch is never reinstalled
        gpu = key.endswith("|True")
        assert ("bitsandbytes" in pinned) == (gpu and notebook.name.startswith("10_")), key
