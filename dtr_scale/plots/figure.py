"""Small multiples of curves against training step, saved atomically: one helper that the
training curves, a run's evaluation results and the comparison of runs all draw with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dtr_scale.io import atomic_write

PANEL_SIZE_IN = (4.5, 3.2)
MAX_PANEL_COLUMNS = 3


@dataclass
class Curve:
    """One line of a panel; `spread` (same length as `values`) draws a band of values +- spread."""

    label: str
    steps: Sequence[float]
    values: Sequence[float]
    spread: Sequence[float] | None = None


@dataclass
class Panel:
    title: str
    curves: list[Curve]
    ylabel: str = ""
    log_y: bool = False
    marks: list[float] = field(default_factory=list)  # steps drawn as dotted vertical lines
    marks_label: str = ""
    xlabel: str = "training step"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def draw_panels(panels: list[Panel], title: str, path: str | Path, dpi: int = 100) -> Path:
    """A PNG with one axes per panel (up to three per row), lines against training step (or the
    panel's own x axis)."""
    if not panels:
        raise ValueError(f"nothing to draw into {path}: no panel has data")
    plt = _pyplot()
    columns = min(MAX_PANEL_COLUMNS, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(PANEL_SIZE_IN[0] * columns, PANEL_SIZE_IN[1] * rows),
                             squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for curve in panel.curves:
            steps, values = np.asarray(curve.steps, float), np.asarray(curve.values, float)
            (line,) = ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3,
                              label=curve.label)
            if curve.spread is not None:
                spread = np.asarray(curve.spread, float)
                ax.fill_between(steps, values - spread, values + spread, color=line.get_color(), alpha=0.2)
        for i, step in enumerate(panel.marks):
            ax.axvline(step, color="0.5", linestyle=":", linewidth=1, label=panel.marks_label if i == 0 else None)
        if panel.log_y:
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if 0 < len(panel.curves) <= 12 or panel.marks_label:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG atomically (a reader never sees half a picture) and close it."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        _pyplot().close(fig)
    return Path(path)
