"""Pair verification metrics: the InsightFace 10-fold protocol, k-fold accuracy for any score, ROC.

Every threshold sweep here is computed at once from sorted scores: for a threshold grid T and a
fold's sorted scores, ``np.searchsorted`` gives how many pairs each threshold accepts, so a sweep over
400 (or 4000) thresholds costs one sort and one binary search per fold instead of a Python loop
re-scanning every pair per threshold (which is how the reference code does it).

Protocol facts reproduced exactly (checked against the authors' outputs, golden case 08):
- embeddings are ``normalize(f(x) + f(flip x))`` in float64; the distance is *squared* L2;
- a pair is predicted "same" when ``dist < thr``, ``thr`` in ``arange(0, 4, 0.01)``;
- folds are contiguous slices in file order (sklearn ``KFold(10, shuffle=False)``: the first
  ``n % k`` folds are one pair longer);
- the best threshold of the 9 training folds is the *first* maximum of the training accuracy;
- tpr/fpr are the per-threshold means over the test folds; VAL@FAR interpolates the threshold
  between the last grid point with FAR <= target and the first with FAR > target (scipy <= 1.8
  ``interp1d(kind="slinear")`` behaviour on the non-strictly-increasing FAR curve).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Rule = Literal["<", "<=", ">=", ">"]

INSIGHTFACE_THRESHOLDS = np.arange(0, 4, 0.01)
INSIGHTFACE_VAL_THRESHOLDS = np.arange(0, 4, 0.001)


def kfold_slices(n: int, n_folds: int = 10) -> list[slice]:
    """Contiguous folds in file order, like sklearn ``KFold(n_folds, shuffle=False)``."""
    if n_folds < 1:
        raise ValueError("n_folds must be >= 1")
    if n < n_folds:
        raise ValueError(f"cannot split {n} pairs into {n_folds} folds")
    sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
    sizes[: n % n_folds] += 1
    stops = np.cumsum(sizes)
    return [slice(int(stop - size), int(stop)) for stop, size in zip(stops, sizes, strict=True)]


def accept_counts(sorted_scores: np.ndarray, thresholds: np.ndarray, rule: Rule) -> np.ndarray:
    """How many of ``sorted_scores`` (ascending) each threshold accepts under ``score <rule> thr``."""
    n = sorted_scores.shape[0]
    if rule == "<":
        return np.searchsorted(sorted_scores, thresholds, side="left")
    if rule == "<=":
        return np.searchsorted(sorted_scores, thresholds, side="right")
    if rule == ">=":
        return n - np.searchsorted(sorted_scores, thresholds, side="left")
    if rule == ">":
        return n - np.searchsorted(sorted_scores, thresholds, side="right")
    raise ValueError(f"unknown rule {rule!r}")


def fold_confusion(
    scores: np.ndarray, issame: np.ndarray, folds: list[slice], thresholds: np.ndarray, rule: Rule
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per fold and threshold: accepted genuine, accepted impostor counts, and fold sizes (pos, neg).

    Returns ``tp (F,T)``, ``fp (F,T)``, ``n_pos (F,)``, ``n_neg (F,)``.
    """
    tp = np.empty((len(folds), thresholds.shape[0]), dtype=np.int64)
    fp = np.empty_like(tp)
    n_pos = np.empty(len(folds), dtype=np.int64)
    n_neg = np.empty(len(folds), dtype=np.int64)
    for f, sl in enumerate(folds):
        s, y = scores[sl], issame[sl]
        pos, neg = np.sort(s[y]), np.sort(s[~y])
        tp[f] = accept_counts(pos, thresholds, rule)
        fp[f] = accept_counts(neg, thresholds, rule)
        n_pos[f], n_neg[f] = pos.shape[0], neg.shape[0]
    return tp, fp, n_pos, n_neg


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num/den as float64, 0 where den is 0 (the reference's convention for empty classes)."""
    den_b = np.broadcast_to(den, num.shape)
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den_b, out=out, where=den_b != 0)
    return out


@dataclass
class KFoldResult:
    """Outcome of a k-fold threshold-selection run."""

    fold_accuracy: np.ndarray  # (F,)
    fold_threshold: np.ndarray  # (F,) the threshold chosen on the other folds
    thresholds: np.ndarray  # (T,) the candidate grid (empty when chosen from the scores)
    tpr: np.ndarray  # (T,) mean over test folds
    fpr: np.ndarray  # (T,)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.fold_accuracy))

    @property
    def std(self) -> float:
        return float(np.std(self.fold_accuracy))


def kfold_accuracy_grid(
    scores: np.ndarray,
    issame: np.ndarray,
    thresholds: np.ndarray,
    rule: Rule = "<",
    n_folds: int = 10,
) -> KFoldResult:
    """InsightFace ``calculate_roc``: fixed threshold grid, best (first max) on the training folds."""
    scores = np.asarray(scores)
    issame = np.asarray(issame, dtype=bool)
    thresholds = np.asarray(thresholds)
    _check_pairs(scores, issame)
    folds = kfold_slices(scores.shape[0], n_folds)
    tp, fp, n_pos, n_neg = fold_confusion(scores, issame, folds, thresholds, rule)
    sizes = n_pos + n_neg
    # training counts = all folds minus the test fold
    tp_train = tp.sum(0, keepdims=True) - tp
    tn_train = (n_neg.sum() - n_neg)[:, None] - (fp.sum(0, keepdims=True) - fp)
    acc_train = (tp_train + tn_train) / (sizes.sum() - sizes)[:, None]
    best = np.argmax(acc_train, axis=1)  # first maximum, like np.argmax in the reference
    rows = np.arange(len(folds))
    tn_test = n_neg - fp[rows, best]
    fold_acc = (tp[rows, best] + tn_test) / sizes
    tpr = _ratio(tp, n_pos[:, None]).mean(0)
    fpr = _ratio(fp, n_neg[:, None]).mean(0)
    return KFoldResult(fold_acc, thresholds[best].astype(np.float64), thresholds, tpr, fpr)


def kfold_accuracy_scores(
    scores: np.ndarray, issame: np.ndarray, higher_is_same: bool = True, n_folds: int = 10
) -> KFoldResult:
    """k-fold accuracy for an unbounded similarity (MLS, SCF, cosine): candidates are the scores.

    On each training split every distinct training score is a candidate threshold (accept when
    ``score >= thr``), plus +inf that accepts nothing; the first maximum of training accuracy (the
    most lenient of the tied thresholds) wins and is applied to the test fold. A distance
    (``higher_is_same=False``) is handled as its negation, so results mirror exactly.
    """
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    _check_pairs(scores, issame)
    sim = scores if higher_is_same else -scores
    folds = kfold_slices(sim.shape[0], n_folds)
    accs, thrs = np.empty(len(folds)), np.empty(len(folds))
    for f, sl in enumerate(folds):
        train = np.ones(sim.shape[0], dtype=bool)
        train[sl] = False
        s, y = sim[train], issame[train]
        cand = np.append(np.unique(s), np.inf)
        pos, neg = np.sort(s[y]), np.sort(s[~y])
        acc = (accept_counts(pos, cand, ">=") + neg.shape[0] - accept_counts(neg, cand, ">=")) / s.shape[0]
        thr = cand[int(np.argmax(acc))]
        accs[f] = np.mean((sim[sl] >= thr) == issame[sl])
        thrs[f] = thr if higher_is_same else -thr
    return KFoldResult(accs, thrs, np.empty(0), np.empty(0), np.empty(0))


def val_at_far(
    scores: np.ndarray,
    issame: np.ndarray,
    far_target: float = 1e-3,
    thresholds: np.ndarray = INSIGHTFACE_VAL_THRESHOLDS,
    rule: Rule = "<",
    n_folds: int = 10,
) -> tuple[float, float, float]:
    """InsightFace ``calculate_val``: (VAL mean, VAL std, FAR mean) over the test folds."""
    scores = np.asarray(scores)
    issame = np.asarray(issame, dtype=bool)
    _check_pairs(scores, issame)
    folds = kfold_slices(scores.shape[0], n_folds)
    tp, fp, n_pos, n_neg = fold_confusion(scores, issame, folds, thresholds, rule)
    fp_train = fp.sum(0, keepdims=True) - fp
    far_train = _ratio(fp_train, (n_neg.sum() - n_neg)[:, None])
    val = np.empty(len(folds))
    far = np.empty(len(folds))
    for f, sl in enumerate(folds):
        curve = far_train[f]
        thr = _interp_threshold(curve, thresholds, far_target) if curve.max() >= far_target else 0.0
        s, y = scores[sl], issame[sl]
        acc = _accept(s, thr, rule)
        val[f] = np.sum(acc & y) / max(n_pos[f], 1)
        far[f] = np.sum(acc & ~y) / max(n_neg[f], 1)
    return float(np.mean(val)), float(np.std(val)), float(np.mean(far))


def _accept(scores: np.ndarray, thr: float, rule: Rule) -> np.ndarray:
    return {"<": np.less, "<=": np.less_equal, ">=": np.greater_equal, ">": np.greater}[rule](scores, thr)


def _interp_threshold(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """Linear interpolation of threshold(FAR) on a non-decreasing FAR curve with repeated values.

    Bracket: the *last* point with FAR <= target and the next one (scipy <= 1.8 slinear).
    """
    j = int(np.searchsorted(far, target, side="right")) - 1
    if j < 0:
        return float(thresholds[0])
    if j >= far.shape[0] - 1:  # target equals the largest FAR: first point reaching it
        return float(thresholds[int(np.searchsorted(far, target, side="left"))])
    x0, x1 = far[j], far[j + 1]
    y0, y1 = thresholds[j], thresholds[j + 1]
    return float(y0 + (target - x0) * (y1 - y0) / (x1 - x0))


def _check_pairs(scores: np.ndarray, issame: np.ndarray) -> None:
    if scores.ndim != 1 or issame.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and issame {issame.shape} must be equal 1-D arrays")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")


# ---------------------------------------------------------------------------------------------
# Embeddings -> the InsightFace .bin protocol
# ---------------------------------------------------------------------------------------------


def _safe_norms(x: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0.0] = 1.0
    return norms


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float64; zero rows stay zero (sklearn ``normalize`` semantics)."""
    x = np.asarray(x, dtype=np.float64)
    return x / _safe_norms(x)[:, None]


def flip_fuse(embeddings: np.ndarray, flipped: np.ndarray | None = None) -> np.ndarray:
    """``normalize(f(x) + f(flip x))`` in float64 (or ``normalize(f(x))`` without flips)."""
    fused = np.asarray(embeddings, dtype=np.float64)
    if flipped is not None:
        if flipped.shape != fused.shape:
            raise ValueError(f"flipped {flipped.shape} must match embeddings {fused.shape}")
        fused = fused + np.asarray(flipped, dtype=np.float64)
    return l2_normalize(fused)


def squared_l2_pairs(emb: np.ndarray) -> np.ndarray:
    """Squared L2 distance of interleaved pairs (rows 2i and 2i+1)."""
    diff = emb[0::2] - emb[1::2]
    np.square(diff, out=diff)
    return np.sum(diff, 1)


@dataclass
class VerificationResult(KFoldResult):
    """The InsightFace protocol's outcome: its k-fold accuracy run on the distance, plus VAL@FAR."""

    val: float = 0.0
    val_std: float = 0.0
    far: float = 0.0
    xnorm: float | None = None
    distance: np.ndarray | None = None  # per pair, the squared L2 the protocol thresholds

    def metrics(self) -> dict:
        """Scalars (and per-fold lists) for a JSON report."""
        out = {"accuracy": self.accuracy, "std": self.std}
        out.update(
            (k, v.tolist() if isinstance(v, np.ndarray) else v)
            for k, v in asdict(self).items()
            if k not in ("tpr", "fpr", "thresholds", "distance")
        )
        return out


def evaluate_embeddings(
    embeddings: np.ndarray,
    issame: np.ndarray,
    flipped: np.ndarray | None = None,
    n_folds: int = 10,
    far_target: float = 1e-3,
) -> VerificationResult:
    """The InsightFace ``test()`` on precomputed backbone outputs (rows 2i/2i+1 form pair i)."""
    embeddings = np.asarray(embeddings)
    issame = np.asarray(issame, dtype=bool)
    if embeddings.ndim != 2 or embeddings.shape[0] != 2 * issame.shape[0]:
        raise ValueError(f"need 2*{issame.shape[0]} embedding rows, got {embeddings.shape}")
    # float64 throughout like the reference (its test() copies the backbone output into float64)
    fused = np.array(embeddings, dtype=np.float64)
    norms = [np.sqrt(np.einsum("ij,ij->i", fused, fused))]
    if flipped is not None:
        if flipped.shape != fused.shape:
            raise ValueError(f"flipped {flipped.shape} must match embeddings {fused.shape}")
        flip64 = np.asarray(flipped, dtype=np.float64)
        norms.append(np.sqrt(np.einsum("ij,ij->i", flip64, flip64)))
        fused += flip64
        del flip64
    xnorm = float(np.mean(np.concatenate(norms)))
    fused /= _safe_norms(fused)[:, None]
    dist = squared_l2_pairs(fused)
    roc = kfold_accuracy_grid(dist, issame, INSIGHTFACE_THRESHOLDS, "<", n_folds)
    val, val_std, far = val_at_far(dist, issame, far_target, INSIGHTFACE_VAL_THRESHOLDS, "<", n_folds)
    return VerificationResult(**vars(roc), val=val, val_std=val_std, far=far, xnorm=xnorm, distance=dist)


# ---------------------------------------------------------------------------------------------
# ROC over all pairs (sklearn ``roc_curve`` semantics) and TAR at FAR
# ---------------------------------------------------------------------------------------------


def roc_curve(
    labels: np.ndarray, scores: np.ndarray, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), higher score = more likely genuine; same points as sklearn's."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores)
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    distinct = np.flatnonzero(np.diff(s)) if s.shape[0] > 1 else np.empty(0, dtype=np.int64)
    ends = np.r_[distinct, y.shape[0] - 1]
    tps = np.cumsum(y, dtype=np.int64)[ends]
    fps = 1 + ends - tps
    thr = s[ends]
    if drop_intermediate and tps.shape[0] > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        tps, fps, thr = tps[keep], fps[keep], thr[keep]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thr = np.r_[np.inf, thr]
    n_neg, n_pos = fps[-1], tps[-1]
    fpr = fps / n_neg if n_neg > 0 else np.full(fps.shape, np.nan)
    tpr = tps / n_pos if n_pos > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thr


FAR_LEVELS = np.array([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])


def tar_at_far_nearest(fpr: np.ndarray, tpr: np.ndarray, far_levels: np.ndarray = FAR_LEVELS) -> np.ndarray:
    """InsightFace IJB rule: the ROC point whose FPR is closest to each level; ties -> largest TPR."""
    fpr_r, tpr_r = fpr[::-1], tpr[::-1]  # the reference flips, then takes the lowest index on ties
    gap = np.abs(fpr_r[None, :] - np.asarray(far_levels)[:, None])
    return tpr_r[np.argmin(gap, axis=1)]


def tar_at_far_interp(fpr: np.ndarray, tpr: np.ndarray, far_levels: np.ndarray = FAR_LEVELS) -> np.ndarray:
    """TAR at each FAR by linear interpolation on the ROC (upper envelope at repeated FPRs)."""
    uniq, first = np.unique(fpr, return_index=True)
    # fpr is non-decreasing, so the best TPR at an FPR is the last one with that FPR
    last = np.r_[first[1:] - 1, fpr.shape[0] - 1]
    return np.interp(np.asarray(far_levels), uniq, tpr[last])
