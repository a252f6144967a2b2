"""Plots every training stage logs to its run (PNG, under `plots/`): the training-loss curve, and per stage
what its evaluation shows: the backbone's verification ROC, a head's accuracy as uncertain pairs are
rejected, the fine-tuning's class compactness before and after (`facepipe.train.spread`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from facepipe import tracking
from facepipe.config import Config
from facepipe.data.dataset import Dataset
from facepipe.eval.verification import evaluate_embeddings
from facepipe.models.bundle import load_bundle
from facepipe.models.embed import embed_pair_table
from facepipe.train.stage import DataInfo

__all__ = ["loss_curve", "rejection_plot", "roc_plot", "write_plots"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def loss_curve(config: Config, run_id: str | None, out_dir: Path, title: str) -> list[Path]:
    """The run's `train/loss` history (what the loop logged), or nothing without a run."""
    history = tracking.client(config.tracking).get_metric_history(run_id, "train/loss") if run_id else []
    if not history:
        return []
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    ax.plot([m.step for m in history], [m.value for m in history], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return [_save(fig, out_dir / "train_loss.png")]


def roc_plot(bundle: Path, data: DataInfo, out_dir: Path, title: str = "Verification ROC") -> list[Path]:
    """ROC of the bundle's flip-fused embeddings on every pair table, one curve each."""
    import numpy as np

    tables = Dataset.at(data.shards_dir).pair_tables
    if not tables:
        return []
    backbone, info, _ = load_bundle(bundle)
    fig, ax = _pyplot().subplots(figsize=(6, 5))
    for name, path in tables.items():
        out = embed_pair_table(backbone, path, info.input_size, info.color_order)
        res = evaluate_embeddings(out["embedding"], out["issame"], out["flipped"])
        ax.plot(np.clip(res.fpr, 1e-4, 1), res.tpr, label=f"{name} (acc {res.accuracy:.3f})")
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(f"{title} (flip-fused embeddings)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3, which="both")
    return [_save(fig, out_dir / "roc.png")]


def rejection_plot(metrics: dict[str, Any], out_dir: Path, method: str) -> list[Path]:
    """A head's risk-controlled accuracy per pair table (`val/<table>/risk_acc_reject_<pct>` metrics):
    accuracy of the pairs kept when the most uncertain are rejected."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for key, value in metrics.items():
        found = re.fullmatch(r"val/(.+)/risk_acc_reject_(\d+)", key)
        if found and isinstance(value, int | float):
            curves.setdefault(found.group(1), []).append((int(found.group(2)), float(value)))
    if not curves:
        return []
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for table, points in sorted(curves.items()):
        points.sort()
        ax.plot([p for p, _ in points], [a for _, a in points], marker="o", label=table)
    ax.set_xlabel("pairs rejected as most uncertain (%)")
    ax.set_ylabel("accuracy of the pairs kept")
    ax.set_title(f"{method}: accuracy vs rejection")
    ax.legend()
    ax.grid(alpha=0.3)
    return [_save(fig, out_dir / "accuracy_vs_rejection.png")]


def write_plots(
    config: Config, run_id: str | None, bundle: Path, data: DataInfo, out_dir: Path
) -> list[Path]:
    """The backbone stage's plots: training loss and the final model's verification ROC."""
    return loss_curve(config, run_id, out_dir, "Backbone training loss") + roc_plot(bundle, data, out_dir)
