"""Evaluation of a trained uncertainty head on the pair tables (the head stage's final metrics)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from facepipe.data.shards import pair_tables
from facepipe.eval.risk import risk_controlled_accuracy
from facepipe.eval.scoring import method_pair_scores
from facepipe.eval.verification import kfold_accuracy_scores
from facepipe.models.embed import decode_images_of, embed_images
from facepipe.train.features import pair_degradation


def evaluate_head(
    backbone: Any,
    head: Any,
    method: Any,
    shards_dir: str | os.PathLike,
    input_size: tuple[int, int],
    color_order: str,
    rejection_rates: list[float],
    raw_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Per pair table: uncertainty-aware 10-fold accuracy, risk-controlled accuracy, and, where the
    generator's `<set>.degradation.parquet` is in `raw_dir`, Spearman(uncertainty, degradation)."""
    import torch
    from scipy.stats import spearmanr

    spec = method  # a registry entry
    metrics: dict[str, float] = {}
    accs = []
    head.eval()
    for name, path in pair_tables(shards_dir).items():
        import pyarrow.parquet as pq

        embs, uncs, scal, issame = [], [], [], []
        for batch in pq.ParquetFile(path).iter_batches(
            batch_size=128, columns=["image_a", "image_b", "issame"]
        ):
            imgs = [
                i
                for pair in zip(
                    batch.column("image_a").to_pylist(), batch.column("image_b").to_pylist(), strict=True
                )
                for i in pair
            ]
            emb, _, fmap = embed_images(
                backbone, decode_images_of(imgs, input_size, color_order, str(path), 0), maps=True
            )
            with torch.no_grad():
                u = head.uncertainty(None, torch.from_numpy(fmap))
            embs.append(emb)
            uncs.append(u.numpy())
            scal.append(spec.uncertainty_scalar(u).numpy())
            issame.append(batch.column("issame").to_numpy(zero_copy_only=False))
        emb = np.concatenate(embs)
        mu = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        u = np.concatenate(uncs)
        s = np.concatenate(scal)
        same = np.concatenate(issame).astype(bool)
        scores = method_pair_scores(spec, mu[0::2], u[0::2], mu[1::2], u[1::2])
        acc = kfold_accuracy_scores(scores, same).accuracy
        metrics[f"val/{name}/accuracy"] = float(acc)
        accs.append(float(acc))
        cosine = np.sum(mu[0::2] * mu[1::2], axis=1)
        pair_unc = np.maximum(s[0::2], s[1::2])
        risk = risk_controlled_accuracy(cosine, same, pair_unc, rejection_rates)
        for r, a in zip(risk.rejection_rates, risk.accuracy, strict=True):
            metrics[f"val/{name}/risk_acc_reject_{int(round(r * 100))}"] = float(a)
        degradation = pair_degradation(raw_dir, name, len(same))
        if degradation is not None:
            rho = spearmanr(s, degradation.reshape(-1)).statistic
            metrics[f"val/{name}/spearman_degradation"] = float(rho)
    if accs:
        metrics["accuracy"] = float(np.mean(accs))
    return metrics
