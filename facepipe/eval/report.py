"""Evaluation reports: one metrics JSON plus PNG plots (the same files training logs to MLflow).

Plots (matplotlib, Agg backend), each written atomically:
- ``roc.png``: TAR vs FAR with a log FAR axis, one curve per score (cosine, MLS, ...);
- ``det.png``: FNMR vs FMR, both axes log (the DET view of the same ROC);
- ``risk.png``: verification accuracy vs the fraction of most-uncertain pairs rejected;
- ``uncertainty_hist.png``: σ² (or 1/κ) histograms split by the sample's degradation level
  (clean < 0.3 ≤ mid ≤ 0.7 < degraded).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from facepipe.eval.metrics import CLEAN_MAX, HEAVY_MIN
from facepipe.eval.plots import figure, save_png, set_labels
from facepipe.fsutil import write_json_atomic

DEGRADATION_BINS = (
    (f"clean (<{CLEAN_MAX:g})", 0.0, CLEAN_MAX),
    (f"mid ({CLEAN_MAX:g}-{HEAVY_MIN:g})", CLEAN_MAX, HEAVY_MIN),
    (f"degraded (>{HEAVY_MIN:g})", HEAVY_MIN, 1.0),
)
UNCERTAINTY_LABELS = {"sigma_sq": "σ² (larger = less certain)", "inv_kappa": "1/κ (larger = less certain)"}


def log_curves(
    ax, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], log_y: bool, **style
) -> tuple[float, float]:
    """Draw ``curves[name] = (x, y)`` on a log x axis (and log y with ``log_y``), leaving off the points a
    log axis cannot show (zeros); returns the smallest positive x and y drawn (1.0 when none)."""
    lo_x, lo_y, drawn = 1.0, 1.0, False
    for name, (x, y) in curves.items():
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        ok = (x > 0) & (y > 0) if log_y else x > 0
        if ok.any():
            drawn = True
            lo_x, lo_y = min(lo_x, float(x[ok].min())), min(lo_y, float(y[ok].min()))
        ax.plot(np.where(ok, x, np.nan), np.where(ok, y, np.nan) if log_y else y, lw=1.5, label=name, **style)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    if not drawn:
        # nothing positive to draw (e.g. no identification errors at all): a log axis without data
        # cannot autoscale, so give it a range and say why it is empty
        ax.set_xlim(1e-4, 1.0)
        if log_y:
            ax.set_ylim(1e-4, 1.0)
        ax.text(0.5, 0.5, "no non-zero values to show", transform=ax.transAxes, ha="center", va="center")
    return lo_x, lo_y


# (x label, y label, default title, legend place) of the two views of one ROC
ROC_AXES = ("False accept rate (FAR, log scale)", "True accept rate (TAR)", "ROC", "lower right")
DET_AXES = (
    "False match rate (FMR, log scale)",
    "False non-match rate (FNMR, log scale)",
    "DET",
    "upper right",
)


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, title: str = ""
) -> Path:
    """TAR vs FAR, log FAR axis from the smallest non-zero FAR (at least 1e-6) to 1."""
    return _plot_roc_view(curves, path, title, det=False)


def plot_det(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, title: str = ""
) -> Path:
    """FNMR vs FMR on log-log axes (``curves[name] = (fpr, tpr)``)."""
    return _plot_roc_view(curves, path, title, det=True)


def _plot_roc_view(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, title: str, det: bool
) -> Path:
    plt, fig, ax = figure()
    if det:
        curves = {name: (fpr, 1.0 - np.asarray(tpr)) for name, (fpr, tpr) in curves.items()}
    lo_x, lo_y = log_curves(ax, curves, log_y=det)
    ax.set_xlim(min(max(lo_x, 1e-6), 0.1), 1.0)
    ax.set_ylim(*((min(max(lo_y, 1e-4), 0.1), 1.0) if det else (0.0, 1.01)))
    x_label, y_label, default, legend = DET_AXES if det else ROC_AXES
    set_labels(ax, x_label, y_label, title or default, legend)
    return save_png(plt, fig, Path(path))


def plot_risk(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Accuracy (%) vs rejection rate (%); ``curves[name] = (rejection_rates, accuracy)``."""
    plt, fig, ax = figure()
    for name, (rates, acc) in curves.items():
        ax.plot(
            100 * np.asarray(rates), 100 * np.asarray(acc, dtype=np.float64), marker="o", lw=1.5, label=name
        )
    ax.set_xlabel("Most uncertain pairs rejected (%)")
    ax.set_ylabel("10-fold verification accuracy on kept pairs (%)")
    ax.set_title(title or "Risk-controlled accuracy")
    ax.grid(True, ls=":", lw=0.6)
    ax.legend(loc="lower right")
    return save_png(plt, fig, Path(path))


def plot_uncertainty_hist(
    uncertainty: np.ndarray,
    degradation: np.ndarray | None,
    path: str | os.PathLike,
    kind: str = "sigma_sq",
    title: str = "",
) -> Path:
    """Histogram of per-image uncertainty, one series per degradation bin (log x when it spans decades)."""
    u = np.asarray(uncertainty, dtype=np.float64).reshape(uncertainty.shape[0], -1).mean(axis=1)
    plt, fig, ax = figure()
    positive = u[u > 0]
    log_x = positive.size > 0 and positive.max() / positive.min() > 30
    lo, hi = (positive.min(), positive.max()) if positive.size else (0.0, 1.0)
    edges = np.geomspace(lo, hi, 41) if log_x else np.linspace(u.min(), u.max() + 1e-12, 41)
    if degradation is None:
        groups = [("all images", np.ones(u.shape[0], dtype=bool))]
    else:
        d = np.asarray(degradation, dtype=np.float64).reshape(-1)
        groups = [(label, mask) for (label, _, _), mask in zip(DEGRADATION_BINS, _bins(d), strict=True)]
    for name, mask in groups:
        if mask.any():
            ax.hist(
                u[mask], bins=edges, alpha=0.5, histtype="stepfilled", label=f"{name}, n={int(mask.sum())}"
            )
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(UNCERTAINTY_LABELS.get(kind, kind) + (" (log scale)" if log_x else ""))
    ax.set_ylabel("Images")
    ax.set_title(title or "Uncertainty by degradation level")
    ax.grid(True, ls=":", lw=0.6)
    ax.legend(loc="best")
    return save_png(plt, fig, Path(path))


def write_metrics(out_dir: str | os.PathLike, metrics: dict, name: str = "metrics.json") -> Path:
    """Write the metrics JSON atomically (numpy values become plain numbers)."""
    path = Path(out_dir) / name
    write_json_atomic(path, _plain(metrics))
    return path


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj


# ---------------------------------------------------------------------------------------------
# The whole pair-table report (what `facepipe evaluate` and the training stages produce)
# ---------------------------------------------------------------------------------------------


def _method_and_u(features, embedding_size: int):
    """(the uncertainty method of `features`, its own u (σ², κ) per image) from the stored values."""
    from facepipe.uncertainty.registry import get_method, method_for_stored  # lazy: torch

    stored = features.uncertainty.reshape(features.uncertainty.shape[0], -1).astype(np.float64)
    if features.method is not None:
        method = get_method(features.method)
    else:
        method = method_for_stored(features.kind, stored.shape[1], embedding_size)
    if stored.shape[1] != method.uncertainty_size(embedding_size):
        raise ValueError(
            f"{method.name} uncertainty has {stored.shape[1]} columns, "
            f"expected {method.uncertainty_size(embedding_size)} for {embedding_size}-d embeddings"
        )
    return method, method.to_stored(stored)  # stored (σ², 1/κ) → the method's u (σ², κ)


def _uncertainty_score(features, fused: np.ndarray) -> tuple[str, np.ndarray] | None:
    """The uncertainty-aware pair score of the features' method (its own `pair_score`), or None."""
    from facepipe.eval.scoring import method_pair_scores

    if features.uncertainty is None:
        return None
    method, u = _method_and_u(features, fused.shape[1])
    return method.score_name, method_pair_scores(method, fused[0::2], u[0::2], fused[1::2], u[1::2])


def _image_uncertainty(features, embedding_size: int) -> np.ndarray:
    """Per-image scalar uncertainty (2P, 1), larger = less certain: the method's `uncertainty_scalar`."""
    import torch

    method, u = _method_and_u(features, embedding_size)
    return method.uncertainty_scalar(torch.from_numpy(u)).numpy().reshape(-1, 1)


def evaluate_pair_features(
    features,
    out_dir: str | os.PathLike,
    name: str = "verification",
    rejection_rates: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3),
    n_folds: int = 10,
    edc=None,
) -> tuple[dict, list[Path]]:
    """Verification report of a :class:`facepipe.eval.features.PairFeatures`: metrics JSON + PNGs.

    ``edc``: :class:`facepipe.eval.edc_report.EdcSettings` (None: the defaults) for the ``edc`` entry
    and the ``edc_fmr_<α>.png`` plots (ISO/IEC 29794-1 EDC of every quality and baseline).

    Metrics: the InsightFace protocol (accuracy ± std, per-fold thresholds, VAL@FAR=1e-3), TAR at
    FAR over all pairs, and when uncertainty is present the uncertainty-aware score's k-fold
    accuracy and ROC, plus risk-controlled accuracy (cosine and uncertainty-aware) per rejection rate.
    """
    from facepipe.eval.ijb import tar_at_far
    from facepipe.eval.risk import pair_uncertainty, risk_controlled_accuracy
    from facepipe.eval.verification import evaluate_embeddings, flip_fuse, kfold_accuracy_scores

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ver = evaluate_embeddings(features.embeddings, features.issame, features.flipped, n_folds)
    fused = flip_fuse(features.embeddings, features.flipped)
    cos = np.einsum("ij,ij->i", fused[0::2], fused[1::2])
    roc_cos = tar_at_far(cos, features.issame)
    metrics: dict = {
        "name": name,
        "n_pairs": features.n_pairs,
        "n_genuine": int(features.issame.sum()),
        "insightface": ver.metrics(),
        "cosine": roc_cos.metrics(),
    }
    if features.fold is not None:
        # the protocol's folds are sklearn KFold slices; say whether the table's fold column agrees
        from facepipe.eval.verification import kfold_slices

        expected = np.empty(features.n_pairs, dtype=np.int64)
        for f, sl in enumerate(kfold_slices(features.n_pairs, n_folds)):
            expected[sl] = f
        metrics["fold_column_matches_protocol"] = bool(np.array_equal(expected, features.fold))
    curves = {"cosine": (roc_cos.fpr, roc_cos.tpr)}
    risk_curves = {}
    paths: list[Path] = []
    unc_score = _uncertainty_score(features, fused)
    if unc_score is not None:
        score_name, scores = unc_score
        kf = kfold_accuracy_scores(scores, features.issame, True, n_folds)
        roc_u = tar_at_far(scores, features.issame)
        metrics[score_name] = {"accuracy": kf.accuracy, "std": kf.std, **roc_u.metrics()}
        curves[score_name] = (roc_u.fpr, roc_u.tpr)
    if features.uncertainty is not None:
        u = _image_uncertainty(features, fused.shape[1])
        pair_u = pair_uncertainty(u[0::2], u[1::2], "max")
        metrics["risk"] = {}
        for label, s in [("cosine", cos)] + ([unc_score] if unc_score is not None else []):
            res = risk_controlled_accuracy(s, features.issame, pair_u, rejection_rates, n_folds)
            metrics["risk"][label] = res.metrics()
            risk_curves[label] = (res.rejection_rates, res.accuracy)
        paths.append(plot_risk(risk_curves, out_dir / "risk.png", f"{name}: accuracy vs rejection"))
        paths.append(
            plot_uncertainty_hist(
                features.uncertainty,
                features.degradation,
                out_dir / "uncertainty_hist.png",
                features.kind,
                f"{name}: uncertainty by degradation level",
            )
        )
        if features.degradation is not None:
            metrics["uncertainty_by_degradation"] = _by_degradation(u.mean(axis=1), features.degradation)
    from facepipe.eval.edc_report import write_edc

    metrics["edc"], edc_paths = write_edc(cos, features.issame, features, out_dir, name, edc)
    paths.extend(edc_paths)
    paths.insert(0, plot_roc(curves, out_dir / "roc.png", f"{name}: ROC"))
    paths.insert(1, plot_det(curves, out_dir / "det.png", f"{name}: DET"))
    paths.insert(0, write_metrics(out_dir, metrics))
    return metrics, paths


def _bins(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image masks of the three degradation bins: clean, mid, degraded."""
    return d < CLEAN_MAX, (d >= CLEAN_MAX) & (d <= HEAVY_MIN), d > HEAVY_MIN


def _by_degradation(u: np.ndarray, degradation: np.ndarray) -> dict:
    bins = _bins(np.asarray(degradation, np.float64).reshape(-1))
    masks = dict(zip(("clean", "mid", "degraded"), bins, strict=True))
    return {k: {"n": int(m.sum()), "mean": float(u[m].mean()) if m.any() else None} for k, m in masks.items()}
