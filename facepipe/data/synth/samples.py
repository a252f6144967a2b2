"""`samples.png`: a contact sheet of generated identities across degradation levels, and relatives."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from facepipe.data.synth import render as sr
from facepipe.data.synth.spec import (
    _S_SAMPLES,
    SynthConfig,
    _rng,
    training_identity,
    verification_identity,
    verification_relative,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- samples figure


def write_samples_png(
    path: Path, cfg: SynthConfig, rows: int = 6, cols: int = 7, relative_pairs: int = 4
) -> Path:
    """Rows: identities, columns: increasing degradation; last row: parent/relative pairs (clean)."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from facepipe.fsutil import atomic_path

    levels = np.linspace(0.0, 1.0, cols)
    fig, axes = plt.subplots(
        rows + 1, max(cols, 2 * relative_pairs), figsize=(1.5 * cols + 0.6, 1.6 * (rows + 1))
    )
    for ax in axes.ravel():
        ax.axis("off")
    for r in range(rows):
        label = r * max(1, cfg.identities // rows) % cfg.identities
        identity = training_identity(cfg, label)
        for c, d in enumerate(levels):
            nz = sr.sample_nuisance(_rng(cfg.seed, _S_SAMPLES, r, c), float(d))
            img = sr.degrade(sr.render_clean(identity, nz, cfg.size), nz)
            axes[r, c].imshow(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
            if r == 0:
                axes[r, c].set_title(f"degradation {d:.2f}", fontsize=8)
        axes[r, 0].text(-8, cfg.size / 2, f"id {label}", fontsize=8, ha="right", va="center")
    spec_index = 0
    for i in range(relative_pairs):
        parent = verification_identity(cfg, i)
        relative = verification_relative(cfg, spec_index, i)
        nz = sr.sample_nuisance(_rng(cfg.seed, _S_SAMPLES, 1000, i), 0.0)
        for j, ident in enumerate((parent, relative)):
            ax = axes[rows, 2 * i + j]
            ax.imshow(cv2.cvtColor(sr.render_clean(ident, nz, cfg.size), cv2.COLOR_BGR2RGB))
            title = f"val id {i}" if j == 0 else "relative: " + "\n".join(ident.redrawn)
            ax.set_title(title, fontsize=7)
    fig.suptitle(
        f"facepipe synth (seed {cfg.seed}): identities × degradation; bottom: hard negatives", fontsize=10
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path
