"""Matplotlib figures for the report files, drawn without pyplot.

Object-oriented Agg figures keep pyplot's global state and backend switch out of the training
process (and out of a notebook that runs a fit).
"""

from __future__ import annotations

from pathlib import Path


def new_figure(width: float, height: float, dpi: int = 100):
    """A ``matplotlib.figure.Figure`` of ``width`` × ``height`` inches with an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path``."""
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    return path
