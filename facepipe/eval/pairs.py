"""One pair table's evaluation: features → the full report, its headline, and the files.

:func:`table_report` is the one evaluation of a pair table. ``facepipe evaluate --features`` calls it on a
features file; :func:`facepipe.eval.model_features.evaluate_model` calls it on every pair table a model
embeds, and that is what ``facepipe evaluate --model`` and the training stages' end-of-stage evaluation
run (:func:`facepipe.train.head_eval.evaluate_head`), with the settings of :func:`eval_options`. So the
same features give the same numbers under the same keys (:mod:`facepipe.eval.metrics`) everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.eval import metrics as M
from facepipe.eval.features import PairFeatures
from facepipe.eval.report import evaluate_pair_features, write_metrics
from facepipe.eval.verification import evaluate_embeddings


def eval_options(ev: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`facepipe.eval.model_features.evaluate_model` from an
    :class:`facepipe.config.EvalConfig` (rejection rates, folds, batch size, flip, EDC settings), and
    the embedding cache of ``eval.embedding_cache`` when set (:mod:`facepipe.eval.embed_cache`)."""
    from facepipe.eval.edc_report import EdcSettings
    from facepipe.eval.embed_cache import EmbeddingCache

    return {
        "rejection_rates": tuple(ev.rejection_rates),
        "n_folds": ev.folds,
        "batch_images": ev.batch_size,
        "flip": ev.flip,
        "edc": EdcSettings.from_config(ev),
        "cache": EmbeddingCache.at(ev.embedding_cache),
    }


def score_names() -> list[str]:
    """The report keys of every registered method's uncertainty-aware score ("mls_pfe", ...)."""
    from facepipe.uncertainty.registry import METHODS  # lazy: torch

    return [spec.score_name for spec in METHODS.values()]


def degradation_metrics(features: PairFeatures, n_folds: int = 10) -> dict[str, Any]:
    """10-fold accuracy on clean (both < 0.3), degraded (either >= 0.3) and heavily degraded (either > 0.7)
    pairs, and Spearman(uncertainty, degradation) per image."""
    if features.degradation is None:
        return {}
    d = np.asarray(features.degradation, dtype=np.float64).reshape(-1, 2)
    out: dict[str, Any] = {}
    known = ~np.isnan(d).any(axis=1)
    worst = np.where(known, np.nan_to_num(d, nan=0.0).max(axis=1), np.nan)
    masks = (known & (worst < M.CLEAN_MAX), known & (worst >= M.CLEAN_MAX), known & (worst > M.HEAVY_MIN))
    for band, mask in zip(M.BANDS, masks, strict=True):
        idx = np.flatnonzero(mask)
        out[M.band_count(band)] = int(idx.size)
        same = features.issame[idx]
        if idx.size < 2 * n_folds or same.all() or not same.any():
            continue  # too few pairs, or one class only: no meaningful k-fold accuracy
        rows = np.stack([2 * idx, 2 * idx + 1], axis=1).reshape(-1)
        flipped = features.flipped[rows] if features.flipped is not None else None
        res = evaluate_embeddings(features.embeddings[rows], same, flipped, n_folds)
        out[M.band_accuracy(band)] = float(res.accuracy)
        out[M.band_std(band)] = float(res.std)
    if features.uncertainty is not None:
        from scipy.stats import spearmanr

        u = features.uncertainty.reshape(features.embeddings.shape[0], -1).mean(axis=1)
        per_image = d.reshape(-1)
        ok = ~np.isnan(per_image)
        if ok.sum() >= 3 and np.ptp(per_image[ok]) > 0 and np.ptp(u[ok]) > 0:
            out[M.SPEARMAN_DEGRADATION] = float(spearmanr(u[ok], per_image[ok]).statistic)
    return out


def edc_headline(edc: dict[str, Any], method: str | None) -> dict[str, float]:
    """``edc_pauc`` of ``method``'s uncertainty at the first supported FMR target (and that target)."""
    if method is None or method not in edc.get("methods", {}):
        return {}
    from facepipe.eval.edc_report import fmr_key

    for alpha in edc["fmr_targets"]:
        entry = edc["methods"][method].get(fmr_key(alpha)) or {}
        if entry.get("supported") and entry.get("pauc") is not None:
            return {M.EDC_PAUC: float(entry["pauc"]), M.EDC_FMR: float(alpha)}
    return {}


def headline(metrics: dict[str, Any], method: str | None = None) -> dict[str, Any]:
    """The headline numbers of one pair table's full report (``metrics["degradation"]`` included)."""
    ver = metrics["insightface"]
    out: dict[str, Any] = {
        M.N_PAIRS: metrics["n_pairs"],
        M.ACCURACY: ver["accuracy"],
        M.STD: ver["std"],
        M.VAL_AT_FAR: ver["val"],
        M.AUC: metrics[M.COSINE]["auc"],
    }
    for score in score_names():
        if score in metrics:
            out[M.score_accuracy(score)] = metrics[score]["accuracy"]
    for label, risk in (metrics.get("risk") or {}).items():
        for rate, acc in zip(risk["rejection_rates"], risk["accuracy"], strict=True):
            out[M.risk_accuracy(label, rate)] = acc
    out.update(edc_headline(metrics.get("edc") or {}, method))
    out.update(metrics.get("degradation") or {})
    return out


def table_report(
    features: PairFeatures,
    out_dir: str | os.PathLike,
    name: str = "verification",
    rejection_rates: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3),
    n_folds: int = 10,
    edc: Any = None,  # facepipe.eval.edc_report.EdcSettings; None: the defaults
) -> tuple[dict[str, Any], dict[str, Any], list[Path]]:
    """(full report, headline, files) of one pair table; ``OUT/metrics.json`` holds the full report with
    its ``degradation`` bands and its headline under ``summary``."""
    from facepipe.eval.edc_report import uncertainty_method

    metrics, paths = evaluate_pair_features(features, out_dir, name, tuple(rejection_rates), n_folds, edc)
    metrics["degradation"] = degradation_metrics(features, n_folds)
    method = uncertainty_method(features).name if features.uncertainty is not None else None
    metrics["summary"] = headline(metrics, method)
    paths[0] = write_metrics(out_dir, metrics)
    return metrics, metrics["summary"], paths
