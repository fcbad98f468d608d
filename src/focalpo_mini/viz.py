"""Plots and widgets for the book: one colour-blind-safe style and the gamma explorer.

Colours are the Okabe-Ito palette (Okabe and Ito, 2008), distinguishable under the common forms of
colour blindness. Each loss keeps one colour throughout the book (``LOSS_COLORS``).
"""

from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.figure import Figure

# Okabe-Ito palette.
BLACK = "#000000"
ORANGE = "#E69F00"
SKY_BLUE = "#56B4E9"
BLUISH_GREEN = "#009E73"
YELLOW = "#F0E442"
BLUE = "#0072B2"
VERMILLION = "#D55E00"
REDDISH_PURPLE = "#CC79A7"
GREY = "#999999"

OKABE_ITO = (ORANGE, SKY_BLUE, BLUISH_GREEN, YELLOW, BLUE, VERMILLION, REDDISH_PURPLE, BLACK)
"""The eight Okabe-Ito colours, in the order matplotlib cycles through them after apply_style()."""

LOSS_COLORS = {
    "dpo": BLACK,
    "focalpo": BLUE,
    "focalpo_detached": BLUISH_GREEN,
    "focal": VERMILLION,
}
"""One colour per loss, used by every figure in the book."""

CORRECT_SHADE = "#009E7318"  # bluish green, mostly transparent: correctly ranked pairs (z > 0)
INCORRECT_SHADE = "#D55E0018"  # vermillion, mostly transparent: misranked pairs (z < 0)


def apply_style() -> None:
    """Set matplotlib's defaults for the book: Okabe-Ito colours, light grid, readable sizes."""
    mpl.rcParams.update(
        {
            "axes.prop_cycle": cycler(color=list(OKABE_ITO)),
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "legend.frameon": False,
            "figure.dpi": 100,
            "savefig.bbox": "tight",
        }
    )


def new_figure(
    ncols: int = 1, *, width: float = 6.4, height: float = 3.6
) -> tuple[Figure, Axes | list[Axes]]:
    """A figure in the book's style with ``ncols`` axes side by side.

    Args:
        ncols: number of axes, ``>= 1``.
        width, height: figure size in inches (the defaults fit the book's text width).

    Returns:
        ``(figure, axes)``: one ``Axes`` when ``ncols == 1``, else a list of them.

    Raises:
        ValueError: if ``ncols < 1`` or a size is not positive.
    """
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be an int >= 1, got {ncols!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be > 0, got {width} and {height}")
    apply_style()
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), layout="constrained")
    return fig, (axes if ncols == 1 else list(axes))
