"""Fetch the book's browser assets from the npm registry so the built HTML needs no CDN.

`make book` runs `python scripts/vendor_assets.py` before the build. It downloads three npm
packages with `npm pack` (tarballs only, no dependency install), copies the files the book loads
into `_vendor/` and writes `_vendor/VERSIONS.json`; a second run with the same pins does nothing.
`_config.yml` lists `_vendor` in `html_static_path` (Sphinx copies it to `_build/html/_static/`)
and points MathJax and myst-nb's widget scripts at it. It is not `_static/` at the book root:
Jupyter Book 1 would add every .js/.css there to every page.

The module is also a Sphinx extension (`local_extensions` in `_config.yml`): it stops the build
when the assets are missing, and drops inline scripts that appear twice on a page (sphinx-thebe
and sphinx-togglebutton write theirs twice; a second `const THEBE_JS_URL` is a SyntaxError).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "_vendor"

# Exact pins. html-manager 1.0.x is the embed manager for ipywidgets 8 (widget protocol 2); 1.0.15
# needs @jupyter-widgets/controls ^5.0.13, the range of the jupyterlab_widgets 3.0.17 bundle that
# ships with ipywidgets 8.1.9 (requirements.txt).
PACKAGES = {
    "@jupyter-widgets/html-manager": "1.0.15",
    "requirejs": "2.3.8",
    "mathjax": "3.2.2",
}

# What to copy: (package, path in its tarball, path under _vendor); "x/" is a folder.
FILES = [
    ("requirejs", "require.js", "require.js"),
    ("@jupyter-widgets/html-manager", "dist/embed-amd.js", "html-manager/dist/embed-amd.js"),
    ("mathjax", "es5/tex-mml-chtml.js", "mathjax/tex-mml-chtml.js"),
    # Loaded on demand by tex-mml-chtml.js: TeX extensions, fonts, the menu, accessibility.
    ("mathjax", "es5/input/", "mathjax/input/"),
    ("mathjax", "es5/output/chtml.js", "mathjax/output/chtml.js"),
    ("mathjax", "es5/output/chtml/", "mathjax/output/chtml/"),
    ("mathjax", "es5/ui/", "mathjax/ui/"),
    ("mathjax", "es5/a11y/", "mathjax/a11y/"),
    ("mathjax", "es5/sre/", "mathjax/sre/"),
    ("mathjax", "LICENSE", "mathjax/LICENSE"),
]

# embed-amd.js finds its Font Awesome files next to itself; they have content-hashed names.
FONT_SUFFIXES = (".woff2", ".woff", ".ttf", ".eot", ".svg")

# Loaded on widget pages between require.js and embed-amd.js (`nb_ipywidgets_js` in _config.yml).
WIDGETS_CONFIG_JS = """\
// Written by scripts/vendor_assets.py; runs between require.js and embed-amd.js on widget pages.
(function () {
  // RequireJS resolves modules against the _static folder this script was served from, so that
  // embed-amd.js locates its Font Awesome files next to itself. Unknown third-party widget modules
  // resolve to a local folder (data-jupyter-widgets-cdn), never to a CDN.
  var here = document.currentScript.src;
  var base = here.slice(0, here.lastIndexOf("/") + 1);
  window.require.config({
    baseUrl: base,
    paths: { "@jupyter-widgets/html-manager/dist": base + "html-manager/dist" },
  });

  // ipywidgets typesets labels with the MathJax 2 API (MathJax.Hub.Queue); the book has MathJax 3.
  var hub = {
    Queue: function (command) {
      var mathjax = window.MathJax;
      var element = command && command[2];
      if (mathjax && typeof mathjax.typesetPromise === "function") {
        mathjax.typesetPromise(element ? [element] : undefined).catch(function (error) {
          console.warn("MathJax could not typeset a widget label", error);
        });
      }
    },
  };
  function withHub(mathjax) {
    if (mathjax && typeof mathjax === "object" && !("Hub" in mathjax)) {
      // Not enumerable: MathJax 3 reads its configuration object's own enumerable keys.
      Object.defineProperty(mathjax, "Hub", { value: hub, enumerable: false });
    }
    return mathjax;
  }
  // MathJax 3 replaces window.MathJax when it loads; keep the shim on whatever object is current.
  var current = withHub(window.MathJax);
  Object.defineProperty(window, "MathJax", {
    configurable: true,
    get: function () { return current; },
    set: function (value) { current = withHub(value); },
  });
})();
"""


def _npm_pack(package: str, version: str, destination: Path) -> Path:
    """Download one package tarball from the npm registry into `destination` and return its path."""
    result = subprocess.run(
        ["npm", "pack", "--silent", "--pack-destination", str(destination), f"{package}@{version}"],
        check=True,
        capture_output=True,
        text=True,
    )
    return destination / result.stdout.strip().splitlines()[-1]


def _is_current() -> bool:
    stamp = VENDOR / "VERSIONS.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != PACKAGES:
        return False
    return all((VENDOR / target.rstrip("/")).exists() for _, _, target in FILES)


def vendor() -> None:
    """Fetch and unpack the pinned packages into `_vendor/`, unless it already holds them."""
    if _is_current():
        print(f"Offline assets present in {VENDOR.relative_to(ROOT)}/ ({_describe()}).")
        return
    if shutil.which("npm") is None:
        sys.exit("npm not found: install Node.js (npm) to fetch the book's offline assets.")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        unpacked = {}
        for package, version in PACKAGES.items():
            tarball = _npm_pack(package, version, tmp)
            unpacked[package] = tmp / package.replace("/", "__")
            with tarfile.open(tarball) as archive:
                archive.extractall(unpacked[package], filter="data")
        staging = tmp / "_vendor"
        for package, source, target in FILES:
            origin = unpacked[package] / "package" / source
            destination = staging / target
            destination.parent.mkdir(parents=True, exist_ok=True)
            if source.endswith("/"):
                shutil.copytree(origin, destination)
            else:
                shutil.copy2(origin, destination)
        dist = unpacked["@jupyter-widgets/html-manager"] / "package" / "dist"
        for font in dist.iterdir():
            if font.suffix in FONT_SUFFIXES:
                shutil.copy2(font, staging / "html-manager" / "dist" / font.name)
        (staging / "widgets-config.js").write_text(WIDGETS_CONFIG_JS)
        (staging / "VERSIONS.json").write_text(json.dumps(PACKAGES, indent=2) + "\n")
        if VENDOR.exists():
            shutil.rmtree(VENDOR)
        shutil.move(str(staging), VENDOR)
    print(f"Fetched offline assets into {VENDOR.relative_to(ROOT)}/ ({_describe()}).")


def _describe() -> str:
    return ", ".join(f"{package} {version}" for package, version in PACKAGES.items())


def _check_assets(app, config) -> None:
    if not _is_current():
        raise RuntimeError(
            f"Offline browser assets missing or outdated in {VENDOR}: run"
            " `python scripts/vendor_assets.py` (`make book` does)."
        )


def _drop_repeated_inline_scripts(app, pagename, templatename, context, doctree) -> None:
    """Keep the first copy of each inline script (no `src`) on a page, drop identical copies."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen = set()
    kept = []
    for script in scripts:
        body = getattr(script, "attributes", {}).get("body")
        if not getattr(script, "filename", None) and body:
            if body in seen:
                continue
            seen.add(body)
        kept.append(script)
    scripts[:] = kept


def setup(app):
    """Sphinx extension entry point (see the module docstring)."""
    app.connect("config-inited", _check_assets)
    app.connect("html-page-context", _drop_repeated_inline_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    vendor()
