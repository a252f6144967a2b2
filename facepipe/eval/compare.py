"""Several uncertainty heads on one backbone, and the quality baselines, compared on the same pairs.

For every pair table, each model's features are those its `facepipe evaluate --model` report saved, when
they match, else the model is embedded (:func:`facepipe.eval.model_features.pair_table_features`); each is
reported as `facepipe evaluate --model` would (detail under ``OUT/models/<method>/<table>/``); the
backbone embeddings must agree across models (same backbone), so every row is judged on the same
comparisons. One row per method:

* an uncertainty head: its own uncertainty-aware score's 10-fold accuracy and TAR@FAR, the accuracy of
  that score after rejecting the ``reject`` fraction of most uncertain pairs (risk-controlled), its EDC
  pAUC per FMR target (cosine comparator, quality = −uncertainty), Spearman(uncertainty, degradation);
* a baseline (feature norm, random, true degradation; see :mod:`facepipe.eval.edc_report`): the cosine
  score's accuracy and TAR@FAR, risk-controlled accuracy of the cosine score rejecting the pairs of
  lowest baseline quality, EDC pAUC, Spearman(−quality, degradation);
* the reference lines of the EDC (ideal, random discard expected): pAUC only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.errors import FacepipeError
from facepipe.eval import metrics as M
from facepipe.eval.edc import EDCResult
from facepipe.eval.edc_report import BASELINES, REFERENCE_LINES, EdcSettings, edc_section, image_qualities

log = logging.getLogger(__name__)

# backbone embeddings of two models count as the same backbone within float32 noise
SAME_BACKBONE_RTOL, SAME_BACKBONE_ATOL = 1e-4, 1e-5


@dataclass(frozen=True)
class CompareSettings:
    """What the comparison reports (from ``eval.*`` of the parameters file, plus two choices)."""

    rejection_rates: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    folds: int = 10
    batch_size: int = 256
    flip: bool = True
    edc: EdcSettings = field(default_factory=EdcSettings)
    far: float = 1e-3  # the TAR@FAR column
    reject: float = 0.2  # the risk-controlled accuracy column: this fraction of pairs rejected

    @classmethod
    def from_config(cls, ev, far: float = 1e-3, reject: float = 0.2) -> CompareSettings:
        """From a :class:`facepipe.config.EvalConfig` and the two columns' choices."""
        edc = EdcSettings.from_config(ev)
        return cls(tuple(ev.rejection_rates), ev.folds, ev.batch_size, ev.flip, edc, far, reject)

    @property
    def rates(self) -> tuple[float, ...]:
        """The rejection rates, always including the table's column."""
        return tuple(sorted({*self.rejection_rates, self.reject}))


@dataclass
class TableComparison:
    """One pair table: the rows, the EDC results (FMR key → method → result) and the risk curves."""

    name: str
    rows: list[dict[str, Any]]
    edc: dict[str, dict[str, EDCResult]]
    risk_curves: dict[str, tuple[list[float], list[float]]]
    n_pairs: int = 0
    edc_section: dict[str, Any] = field(default_factory=dict)  # the ``edc`` entry of these pairs

    @property
    def unsupported(self) -> dict[str, str]:
        """FMR key → why these pairs cannot fix a threshold there (see facepipe.eval.edc_report)."""
        return self.edc_section.get("unsupported", {})


def method_labels(models: list) -> list[str]:
    """A unique row label per model: its method name (``backbone`` without a head), #2… on repeats."""
    seen: dict[str, int] = {}
    labels = []
    for model in models:
        base = model.method or "backbone"
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return labels


def _spearman(quality: np.ndarray, degradation: np.ndarray | None) -> float | None:
    """Spearman(−quality, degradation) per image: +1 when uncertainty ranks images as degradation does."""
    from scipy.stats import spearmanr

    if degradation is None:
        return None
    d = np.asarray(degradation, dtype=np.float64).reshape(-1)
    ok = np.isfinite(d)
    if ok.sum() < 3 or np.ptp(d[ok]) == 0 or np.ptp(quality[ok]) == 0:
        return None
    return float(spearmanr(-quality[ok], d[ok]).statistic)


def _tar(metrics: dict, far: float) -> float:
    try:
        return float(metrics["tar_at_far_interp"][f"{far:.0e}"])
    except KeyError:
        known = sorted(metrics["tar_at_far_interp"])
        raise FacepipeError(f"TAR@FAR={far:g} is not reported; pick one of {known}") from None


def _risk_at(risk: dict, reject: float) -> float:
    rates = np.asarray(risk["rejection_rates"])
    return float(np.asarray(risk["accuracy"])[int(np.argmin(np.abs(rates - reject)))])


def _row(
    accuracy: float, roc: dict, risk: dict, quality: np.ndarray, degradation, settings: CompareSettings
) -> dict[str, Any]:
    """The numeric columns of one comparison row (keys of facepipe.eval.metrics)."""
    return {
        M.ACCURACY: float(accuracy),
        M.TAR_AT_FAR: _tar(roc, settings.far),
        M.RISK_AT_REJECT: _risk_at(risk, settings.reject),
        M.SPEARMAN_QUALITY: _spearman(quality, degradation),
    }


def _check_same_backbone(features: list, labels: list[str], table: str) -> None:
    first = features[0].embeddings
    for f, label in zip(features[1:], labels[1:], strict=True):
        if f.embeddings.shape != first.shape or not np.allclose(
            f.embeddings, first, rtol=SAME_BACKBONE_RTOL, atol=SAME_BACKBONE_ATOL
        ):
            raise FacepipeError(
                f"{label} and {labels[0]} give different backbone embeddings on {table}: "
                "a comparison needs heads trained on the same backbone"
            )


def table_features(
    models: list,
    labels: list[str],
    path: Path,
    settings: CompareSettings,
    reports: list[str | os.PathLike | None] | None = None,
    cache=None,  # facepipe.eval.embed_cache.EmbeddingCache, for the models embedded here
) -> list:
    """Each model's features on the pair table `path`: those its evaluation report (``reports[i]``, see
    `facepipe evaluate --model`) saved when they match (same weights, table bytes and flip), else the
    model run over the table. Which it was is logged."""
    from facepipe.eval.model_features import pair_table_features, saved_pair_features

    features = []
    for model, label, report in zip(models, labels, reports or [None] * len(models), strict=True):
        found, why = saved_pair_features(report, model, path, settings.flip) if report else (None, "")
        if found is None:
            log.info("%s on %s: embedding%s", label, path.stem, f" ({why})" if why else "")
            order = model.info.color_order
            found = pair_table_features(model, path, order, settings.batch_size, settings.flip, cache=cache)
        else:
            log.info("%s on %s: %s", label, path.stem, why)
        features.append(found)
    return features


def compare_table(
    models: list,
    labels: list[str],
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: CompareSettings,
    features: list | None = None,
) -> TableComparison:
    """Compare every model (and the baselines) on one pair table; per-model reports go under out_dir.
    `features`: the models' features on it (default: :func:`table_features`, each model embedded)."""
    from facepipe.eval.edc_report import uncertainty_method
    from facepipe.eval.ijb import tar_at_far
    from facepipe.eval.report import evaluate_pair_features
    from facepipe.eval.risk import risk_controlled_accuracy
    from facepipe.eval.verification import evaluate_embeddings, flip_fuse

    path, out_dir = Path(path), Path(out_dir)
    table = path.stem
    features = features or table_features(models, labels, path, settings)
    _check_same_backbone(features, labels, table)
    base = features[0]
    fused = flip_fuse(base.embeddings, base.flipped)
    cos = np.einsum("ij,ij->i", fused[0::2], fused[1::2])
    qualities: dict[str, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for model, label, f in zip(models, labels, features, strict=True):
        if f.uncertainty is None:
            log.warning("%s (%s) has no uncertainty head: it adds no row", label, model.source)
            continue
        detail = out_dir / "models" / label / table
        metrics, _ = evaluate_pair_features(f, detail, table, settings.rates, settings.folds, settings.edc)
        spec = uncertainty_method(f)
        q = image_qualities(f)[spec.name]
        qualities[label] = q
        own = metrics[spec.score_name]
        risk = metrics["risk"][spec.score_name]
        curves[f"{label} ({spec.score_name})"] = (risk["rejection_rates"], risk["accuracy"])
        head = {"method": label, "kind": "uncertainty head", "source": model.source, "score": spec.score_name}
        rows.append(head | _row(own["accuracy"], own, risk, q, f.degradation, settings))
    # baselines: the cosine score, pairs ranked by a quality that is not a head's
    ver = evaluate_embeddings(base.embeddings, base.issame, base.flipped, settings.folds)
    cos_metrics = tar_at_far(cos, base.issame).metrics()
    baseline_q = {k: v for k, v in image_qualities(base).items() if k in BASELINES}
    for name, q in baseline_q.items():
        pair_u = -np.minimum(q[0::2], q[1::2])
        risk = risk_controlled_accuracy(cos, base.issame, pair_u, settings.rates, settings.folds).metrics()
        curves[f"{name} ({M.COSINE})"] = (risk["rejection_rates"], risk["accuracy"])
        source = "backbone embedding" if name == "feature_norm" else ""
        row = {"method": name, "kind": "baseline", "source": source, "score": M.COSINE}
        rows.append(row | _row(ver.accuracy, cos_metrics, risk, q, base.degradation, settings))
    qualities.update(baseline_q)
    section, results = edc_section(cos, base.issame, qualities, settings.edc)
    for name in REFERENCE_LINES:
        rows.append({"method": name, "kind": "EDC reference", "source": "", "score": M.COSINE})
    for row in rows:  # None at an unsupported FMR target (see facepipe.eval.edc_report)
        row[M.PAUC] = {k: v["pauc"] for k, v in section["methods"][row["method"]].items()}
    return TableComparison(table, rows, results, curves, base.n_pairs, section)
