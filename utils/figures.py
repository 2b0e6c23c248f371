"""PNG figures written like every result file (atomically, a full disk named), and laid out with margins in inches.

Fixed margins let matplotlib draw a figure once; ``bbox_inches="tight"`` draws it twice (once to measure), which
was about half of a sweep's plotting time. Figures whose extent depends on their text (a legend of run names under
the panels) still ask for the tight box.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")   # headless: the suite runs on servers and in CI
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from utils.errors import full_disk_named
from utils.io import atomic_path

__all__ = ["set_margins", "save_figure"]


def set_margins(fig: Figure, left: float, right: float, bottom: float, top: float, wspace: float = 0.0,
                hspace: float = 0.0) -> None:
    """Place the figure's grid of subplots with the margins and the gaps between panels given in inches."""
    width, height = fig.get_size_inches()
    spec = fig.axes[0].get_subplotspec()
    assert spec is not None
    rows, cols = spec.get_gridspec().get_geometry()
    panel_w = (width - left - right - wspace * (cols - 1)) / cols
    panel_h = (height - bottom - top - hspace * (rows - 1)) / rows
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=wspace / panel_w, hspace=hspace / panel_h)


def save_figure(fig: Figure, path: Path, what: str, dpi: int = 110, tight: bool = False,
                metadata: dict[str, Any] | None = None) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically, and close it; a full disk or a file-size limit names the folder
    (``what`` says which) and leaves no file. ``tight``: crop to the drawn extent (one more drawing pass)."""
    try:
        with full_disk_named(path.parent, what), atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight" if tight else None, metadata=metadata)
    finally:
        plt.close(fig)
    return path
