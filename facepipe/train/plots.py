"""Plots of a finished backbone run: the training-loss curve and the final model's verification ROC."""

from __future__ import annotations

from pathlib import Path

from facepipe import tracking
from facepipe.config import Config
from facepipe.data.shards import pair_tables
from facepipe.eval.verification import evaluate_embeddings
from facepipe.models.bundle import load_bundle
from facepipe.models.embed import embed_pair_table
from facepipe.train.stage import DataInfo


def write_plots(
    config: Config, run_id: str | None, bundle: Path, data: DataInfo, out_dir: Path
) -> list[Path]:
    """Training curves (from the run's metric history) and ROC curves of the final model, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if run_id:
        history = tracking.client(config.tracking).get_metric_history(run_id, "train/loss")
        if history:
            steps = [m.step for m in history]
            values = [m.value for m in history]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(steps, values, lw=1.5)
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
            ax.set_title("Backbone training loss")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            paths.append(out_dir / "train_loss.png")
            fig.savefig(paths[-1], dpi=120)
            plt.close(fig)
    backbone, info, _ = load_bundle(bundle)
    tables = pair_tables(data.shards_dir)
    if tables:
        fig, ax = plt.subplots(figsize=(6, 5))
        for name, path in tables.items():
            out = embed_pair_table(backbone, path, info.input_size, info.color_order)
            res = evaluate_embeddings(out["embedding"], out["issame"], out["flipped"])
            fpr = np.clip(res.fpr, 1e-4, 1)
            ax.plot(fpr, res.tpr, label=f"{name} (acc {res.accuracy:.3f})")
        ax.set_xscale("log")
        ax.set_xlim(1e-3, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.set_title("Verification ROC (flip-fused embeddings)")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        paths.append(out_dir / "roc.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
