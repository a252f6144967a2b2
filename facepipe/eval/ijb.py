"""IJB-style template evaluation: image -> media -> template aggregation, 1:1 scores, TAR@FAR.

InsightFace's rule (``eval_ijbc.py``, golden case 09), with its three switches on:
1. image feature = f(x) + f(flip x) (added, not concatenated), norm kept, times the detector score;
2. the images of one media (frames of a video) are averaged; media features are *summed*;
3. the template is L2-normalised and pairs are scored by the dot product.
Here the media mean + template sum is one sparse matrix product (each image weighted by 1 / the
size of its media in that template), streamed over image chunks, instead of a Python loop over
templates and medias.

Uncertainty-aware fusions plug in as a callable ``fuse(mu, u) -> (mu_t, u_t)`` applied to all
images of a template (PFE, ProbFace, SCF provide one each in ``facepipe.uncertainty``), and the
fused templates are scored with ``pair_score(mu_a, u_a, mu_b, u_b)`` or a named metric of
:mod:`facepipe.eval.scoring`.

TAR@FAR is reported two ways: InsightFace's (the ROC point with the closest FPR, ties to the larger
TPR, on sklearn's ``roc_curve`` with intermediate points dropped) and by linear interpolation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from facepipe.eval.scoring import PairScore, score_pairs
from facepipe.eval.verification import (
    FAR_LEVELS,
    l2_normalize,
    roc_curve,
    tar_at_far_interp,
    tar_at_far_nearest,
)

Fuse = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray | None]]
IMAGE_CHUNK = 16384


def image_features(
    embeddings: np.ndarray,
    flipped: np.ndarray | None = None,
    faceness: np.ndarray | None = None,
    keep_norm: bool = True,
) -> np.ndarray:
    """Per-image feature of the IJB protocol (flip added, optional normalisation, × detector score).

    Returns a fresh float64 array (computed in place, so one chunk costs one array of memory).
    """
    x = np.array(embeddings, dtype=np.float64)
    if flipped is not None:
        x += flipped
    if not keep_norm:
        x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    if faceness is not None:
        x *= np.asarray(faceness, dtype=np.float64)[:, None]
    return x


def _group_ids(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique keys, index of each element's key)."""
    uniq, inv = np.unique(keys, return_inverse=True)
    return uniq, inv.reshape(-1)


def aggregate_insightface(
    embeddings: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    flipped: np.ndarray | None = None,
    faceness: np.ndarray | None = None,
    keep_norm: bool = True,
    chunk: int = IMAGE_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Template features (float64, unit rows) and the sorted unique template ids.

    Works in image chunks, so memory is O(templates·D + chunk·D) even for 469k images.
    """
    import scipy.sparse as sp

    templates = np.asarray(templates).reshape(-1)
    medias = np.asarray(medias).reshape(-1)
    n = embeddings.shape[0]
    if not (templates.shape[0] == medias.shape[0] == n):
        raise ValueError(f"templates {templates.shape}, medias {medias.shape}, embeddings {embeddings.shape}")
    uniq_t, t_idx = _group_ids(templates)
    # (template, media) groups: every image weighs 1 / its group size (media mean, then sum)
    m_off = medias.astype(np.int64) - int(medias.min())
    _, tm_idx = _group_ids(t_idx.astype(np.int64) * (int(m_off.max()) + 1) + m_off)
    weight = 1.0 / np.bincount(tm_idx)[tm_idx]
    out = np.zeros((uniq_t.shape[0], embeddings.shape[1]), dtype=np.float64)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = image_features(
            embeddings[s:e],
            None if flipped is None else flipped[s:e],
            None if faceness is None else faceness[s:e],
            keep_norm,
        )
        m = sp.csr_matrix((weight[s:e], (t_idx[s:e], np.arange(e - s))), shape=(uniq_t.shape[0], e - s))
        out += m @ x
    return l2_normalize(out), uniq_t


def aggregate_with(
    mu: np.ndarray, unc: np.ndarray | None, templates: np.ndarray, fuse: Fuse
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Apply a fusion callable to the images of each template: (mu_t, u_t, sorted unique ids)."""
    templates = np.asarray(templates).reshape(-1)
    uniq_t, t_idx = _group_ids(templates)
    order = np.argsort(t_idx, kind="stable")
    bounds = np.zeros(uniq_t.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(t_idx, minlength=uniq_t.shape[0]), out=bounds[1:])
    mus, uncs = [], []
    for g in range(uniq_t.shape[0]):
        sel = order[bounds[g] : bounds[g + 1]]
        m, u = fuse(mu[sel], None if unc is None else unc[sel])
        mus.append(np.asarray(m).reshape(-1))
        uncs.append(None if u is None else np.asarray(u).reshape(-1))
    mu_t = np.stack(mus)
    unc_t = None if any(u is None for u in uncs) else np.stack(uncs)
    return mu_t, unc_t, uniq_t


def template_index(unique_templates: np.ndarray, ids: np.ndarray, what: str = "pair list") -> np.ndarray:
    """Row of each template id in ``unique_templates`` (sorted); unknown ids are an error."""
    ids = np.asarray(ids).reshape(-1)
    pos = np.searchsorted(unique_templates, ids)
    pos_c = np.minimum(pos, unique_templates.shape[0] - 1)
    bad = unique_templates[pos_c] != ids
    if np.any(bad):
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what}: template id {ids[first]} (row {first}) has no images")
    return pos_c


@dataclass
class TemplateVerification:
    scores: np.ndarray
    labels: np.ndarray
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    far_levels: np.ndarray
    tar_nearest: np.ndarray
    tar_interp: np.ndarray
    auc: float

    def metrics(self) -> dict:
        def key(x: float) -> str:
            return f"{x:.0e}"

        return {
            "n_pairs": int(self.scores.shape[0]),
            "n_genuine": int(self.labels.sum()),
            "auc": self.auc,
            "tar_at_far_nearest": {
                key(f): float(t) for f, t in zip(self.far_levels, self.tar_nearest, strict=True)
            },
            "tar_at_far_interp": {
                key(f): float(t) for f, t in zip(self.far_levels, self.tar_interp, strict=True)
            },
        }


def tar_at_far(
    scores: np.ndarray, labels: np.ndarray, far_levels: np.ndarray = FAR_LEVELS
) -> TemplateVerification:
    """ROC of pair scores and TAR at each FAR level (nearest point and interpolated)."""
    labels = np.asarray(labels).astype(bool)
    fpr, tpr, thr = roc_curve(labels, scores)
    return TemplateVerification(
        scores=np.asarray(scores),
        labels=labels,
        fpr=fpr,
        tpr=tpr,
        thresholds=thr,
        far_levels=np.asarray(far_levels),
        tar_nearest=tar_at_far_nearest(fpr, tpr, far_levels),
        tar_interp=tar_at_far_interp(fpr, tpr, far_levels),
        auc=float(np.trapezoid(tpr, fpr)),
    )


def verify_templates(
    template_feats: np.ndarray,
    unique_templates: np.ndarray,
    p1: np.ndarray,
    p2: np.ndarray,
    labels: np.ndarray,
    metric: str | PairScore = "cosine",
    template_unc: np.ndarray | None = None,
    far_levels: np.ndarray = FAR_LEVELS,
) -> TemplateVerification:
    """Score template pairs (ids p1, p2) and compute the ROC / TAR@FAR table."""
    ia = template_index(unique_templates, p1, "p1")
    ib = template_index(unique_templates, p2, "p2")
    scores = score_pairs(template_feats, ia, ib, metric, template_unc)
    return tar_at_far(scores, labels, far_levels)
