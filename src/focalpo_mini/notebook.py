"""What the chapters need to run the same way in the book's build and on Colab: :func:`glue`.

The book's build has myst-nb, which stores a value under a name for the text to show; Colab does
not, and a chapter must not need a build-only package to run.
"""

from __future__ import annotations


def glue(name: str, value, display: bool = True) -> None:
    """``myst_nb.glue(name, value, display)`` where myst-nb is installed (the book's build);
    elsewhere, prints ``name = value`` so that a reader sees what the text refers to.

    Args:
        name: the key the book's text uses (``{glue:text}`name```).
        value: any object; shown with ``str``.
        display: also show the value where the cell runs (myst-nb only; the fallback always
            prints).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not isinstance(display, bool):
        raise TypeError(f"display must be True or False, got {display!r}")
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        print(f"{name} = {value}")
        return
    myst_glue(name, value, display=display)
