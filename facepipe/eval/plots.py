"""Shared matplotlib plumbing for the report PNGs: an Agg figure, readable labels, an atomic save."""

from __future__ import annotations

from pathlib import Path

from facepipe.fsutil import atomic_path


def figure(width: float = 6.4, height: float = 4.8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    return plt, fig, ax


def save_png(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def set_labels(ax, xlabel: str, ylabel: str, title: str, legend_loc: str) -> None:
    """Axis labels, title, a light log-friendly grid and the legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", ls=":", lw=0.6)
    ax.legend(loc=legend_loc)
