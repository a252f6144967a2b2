"""Risk-controlled verification accuracy (the ProbFace protocol), for any per-image uncertainty.

For each rejection rate r, pairs whose uncertainty exceeds the (1-r) percentile are dropped and a
10-fold accuracy is computed on what is kept. The pair uncertainty is ``max(u_a, u_b)`` (or the
sum, ProbFace's "add" variant); ``u`` is anything where larger means less reliable: PFE/ProbFace
σ², SCF 1/κ, or a negated quality score.

Quirks of the authors' evaluation reproduced exactly (golden case 06), because the reported
numbers depend on them:
- the score is the cosine; candidate thresholds on a training split are its *genuine* scores
  (sorted), a pair is "same" when ``score >= thr``;
- the chosen threshold is the *mean of all candidates tied* at the best training accuracy
  (duplicates included), stored in float32; fold accuracies are stored in float32 and the reported
  accuracy/threshold are float32 means over folds;
- folds are contiguous slices (in file order) of the *kept* pairs.
The per-threshold sweep is vectorised (sorted scores + binary search) instead of the reference's
loop over every candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from facepipe.eval.verification import kfold_slices

DEFAULT_REJECTION_RATES = (0.0, 0.1, 0.2, 0.3)


def pair_cosine(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """Cosine of row pairs, normalising each row (in the input dtype, like the reference)."""
    x1 = x1 / np.linalg.norm(x1, axis=1, keepdims=True)
    x2 = x2 / np.linalg.norm(x2, axis=1, keepdims=True)
    return np.sum(x1 * x2, axis=1)


def pair_uncertainty(u_a: np.ndarray, u_b: np.ndarray, how: Literal["max", "add"] = "max") -> np.ndarray:
    """Per-pair uncertainty from per-image values: max (default) or sum."""
    u_a = np.asarray(u_a).reshape(u_a.shape[0], -1)
    u_b = np.asarray(u_b).reshape(u_b.shape[0], -1)
    if u_a.shape[1] != 1:  # per-dimension variances: summarise each image by its mean
        u_a, u_b = u_a.mean(1, keepdims=True), u_b.mean(1, keepdims=True)
    fused = np.maximum(u_a, u_b) if how == "max" else u_a + u_b
    return fused[:, 0]


def best_threshold_positive_candidates(scores: np.ndarray, labels: np.ndarray) -> tuple[float, np.float32]:
    """Training-split search of the reference: candidates = sorted genuine scores, ``score >= thr``.

    Returns (best accuracy, mean of the candidates tied at it, as float32).
    """
    cand = np.sort(scores[labels])
    if cand.shape[0] == 0:
        raise ValueError("a training split has no genuine pairs; lower the rejection rate or fold count")
    pos_sorted = cand  # the candidates are exactly the genuine scores
    neg_sorted = np.sort(scores[~labels])
    tp = pos_sorted.shape[0] - np.searchsorted(pos_sorted, cand, side="left")
    tn = np.searchsorted(neg_sorted, cand, side="left")
    acc = (tp + tn) / scores.shape[0]
    best = acc.max()
    return float(best), np.float32(np.mean(cand[acc == best]))


def kfold_accuracy_positive_candidates(
    scores: np.ndarray, issame: np.ndarray, n_folds: int = 10
) -> tuple[np.float32, np.float32, np.ndarray, np.ndarray]:
    """(mean accuracy, mean threshold, per-fold accuracy, per-fold threshold), all float32."""
    folds = kfold_slices(scores.shape[0], n_folds)
    accs = np.zeros(n_folds, dtype=np.float32)
    thrs = np.zeros(n_folds, dtype=np.float32)
    n = scores.shape[0]
    for f, sl in enumerate(folds):
        train = np.ones(n, dtype=bool)
        train[sl] = False
        _, thrs[f] = best_threshold_positive_candidates(scores[train], issame[train])
        test_pred = scores[sl] >= np.array([thrs[f]])
        accs[f] = np.mean(test_pred == issame[sl])
    return np.mean(accs), np.mean(thrs), accs, thrs


@dataclass
class RiskResult:
    rejection_rates: np.ndarray  # (R,)
    risk_threshold: np.ndarray  # (R,) uncertainty percentile used as the cut
    n_kept: np.ndarray  # (R,)
    n_total: int
    accuracy: np.ndarray  # (R,) float32, as the reference stores it
    threshold: np.ndarray  # (R,) float32 score threshold (mean over folds)

    def metrics(self) -> dict:
        return {
            "rejection_rates": self.rejection_rates.tolist(),
            "risk_threshold": [float(x) for x in self.risk_threshold],
            "n_kept": self.n_kept.tolist(),
            "n_total": self.n_total,
            "accuracy": [float(x) for x in self.accuracy],
            "threshold": [float(x) for x in self.threshold],
        }


def risk_controlled_accuracy(
    scores: np.ndarray,
    issame: np.ndarray,
    pair_unc: np.ndarray,
    rejection_rates: Sequence[float] = DEFAULT_REJECTION_RATES,
    n_folds: int = 10,
    accuracy_fn: Callable[[np.ndarray, np.ndarray, int], tuple] | None = None,
) -> RiskResult:
    """Accuracy after rejecting the most uncertain fraction r of pairs, for each r.

    ``scores``: similarity per pair (higher = same); ``pair_unc``: per-pair uncertainty.
    ``accuracy_fn(scores, issame, n_folds) -> (accuracy, threshold, ...)`` defaults to the
    reference's positive-candidate k-fold search.
    """
    scores = np.asarray(scores)
    issame = np.asarray(issame, dtype=bool)
    pair_unc = np.asarray(pair_unc).ravel()
    if not (scores.shape == issame.shape == pair_unc.shape) or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape}, issame {issame.shape}, uncertainty {pair_unc.shape} differ")
    if not np.all(np.isfinite(pair_unc)):
        raise ValueError("pair uncertainty contains NaN or infinite values")
    accuracy_fn = accuracy_fn or kfold_accuracy_positive_candidates
    rates = np.asarray(rejection_rates, dtype=np.float64)
    if np.any((rates < 0) | (rates >= 1)):
        raise ValueError(f"rejection rates must be in [0, 1): {rates.tolist()}")
    cuts, kept, accs, thrs = [], [], [], []
    for r in rates:
        cut = np.percentile(pair_unc, (1 - r) * 100)
        keep = np.flatnonzero(pair_unc <= cut)
        if keep.shape[0] == 0:  # reference: an empty selection falls back to all pairs
            keep = np.arange(scores.shape[0])
        acc, thr = accuracy_fn(scores[keep], issame[keep], n_folds)[:2]
        cuts.append(cut)
        kept.append(keep.shape[0])
        accs.append(acc)
        thrs.append(thr)
    return RiskResult(
        rejection_rates=rates,
        risk_threshold=np.asarray(cuts),
        n_kept=np.asarray(kept, dtype=np.int64),
        n_total=int(scores.shape[0]),
        accuracy=np.asarray(accs, dtype=np.float32),
        threshold=np.asarray(thrs, dtype=np.float32),
    )


def risk_from_interleaved(
    embeddings: np.ndarray,
    issame: np.ndarray,
    uncertainty: np.ndarray,
    how: Literal["max", "add"] = "max",
    rejection_rates: Sequence[float] = DEFAULT_REJECTION_RATES,
    n_folds: int = 10,
) -> RiskResult:
    """ProbFace ``eval_images_with_sigma`` on interleaved rows (2i, 2i+1 = pair i), cosine score."""
    embeddings = np.asarray(embeddings)
    uncertainty = np.asarray(uncertainty).reshape(embeddings.shape[0], -1)
    scores = pair_cosine(embeddings[0::2], embeddings[1::2])
    unc = pair_uncertainty(uncertainty[0::2], uncertainty[1::2], how)
    return risk_controlled_accuracy(scores, issame, unc, rejection_rates, n_folds)
