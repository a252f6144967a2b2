"""Pair scores at scale: the engine that runs cosine or an uncertainty method's own score on many pairs.

The scores themselves belong to the methods (`facepipe.uncertainty`): callers pass the method's
``pair_score`` (gathered rows) or ``score_from_cos`` (GEMM path), wrapped by :func:`numpy_callable`.

Two ways to score a list of (row a, row b) pairs of a feature table:
- *gather*: copy the two rows of each pair and reduce them, in fixed-size chunks so memory stays
  flat whatever the number of pairs (the only way for per-dimension MLS or an arbitrary callable);
- *template x template product*: compact the rows and columns that occur in some pair, cut the
  rows into bands whose score matrix against all needed columns fits a memory budget, and compute
  each band with one GEMM, then read the needed entries. Protocols like IJB-C compare a set of
  enrolment templates against a set of probe templates, so a band is usually dense enough that
  one GEMM beats gathering its pairs one by one; too-sparse bands fall back to gathering. Only
  scores that are a function of ``mu_a·mu_b`` (plus per-row scalars) can use it: cosine, and a method
  that provides ``score_from_cos`` (ProbFace's scalar-σ² MLS).

Conventions: every score is a similarity (higher = more likely the same identity).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

DEFAULT_CHUNK = 4096
MLS_CHUNK = 512  # small chunks keep the four gathered blocks in cache (measured best for D=512)
LOCALITY_BLOCK = 256
# a band of the template x template score matrix is at most this big
DEFAULT_BAND_BYTES = 512 << 20
# a band is scored by GEMM when at least this fraction of its entries is needed: one GEMM entry
# costs ~2·D flops at tens of GFLOP/s, one gathered pair ~2·D scattered reads; about 1/50 breaks even
DENSE_FRACTION = 1 / 50


class PairScore(Protocol):
    """``pair_score(mu_a, u_a, mu_b, u_b) -> scores`` on gathered rows (u may be None)."""

    def __call__(
        self, mu_a: np.ndarray, u_a: np.ndarray | None, mu_b: np.ndarray, u_b: np.ndarray | None
    ) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------
# Row-pair score functions (inputs already gathered: (n, D) each)
# ---------------------------------------------------------------------------------------------


def cosine_rows(mu_a: np.ndarray, u_a: object, mu_b: np.ndarray, u_b: object) -> np.ndarray:
    """Dot product of already L2-normalised rows."""
    return np.einsum("ij,ij->i", mu_a, mu_b)


# ---------------------------------------------------------------------------------------------
# Chunked pair scoring
# ---------------------------------------------------------------------------------------------


def _check_indices(ia: np.ndarray, ib: np.ndarray, n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
    ia = np.asarray(ia, dtype=np.int64).ravel()
    ib = np.asarray(ib, dtype=np.int64).ravel()
    if ia.shape != ib.shape:
        raise ValueError(f"index arrays differ in length: {ia.shape[0]} vs {ib.shape[0]}")
    if ia.size and (ia.min() < 0 or ia.max() >= n_a or ib.min() < 0 or ib.max() >= n_b):
        raise ValueError("pair index out of range of the feature table")
    return ia, ib


def locality_order(
    ia: np.ndarray, ib: np.ndarray, n_a: int, n_b: int, block: int = LOCALITY_BLOCK
) -> np.ndarray:
    """A pair order in which consecutive pairs read rows from the same small blocks of both tables.

    Pairs are grouped by (ia // block, ib // block); a chunk of consecutive pairs then gathers from
    two cache-sized regions instead of the whole table, which made per-dimension MLS ~8x faster at
    IJB-C size. Keys are kept below 2^15 so numpy's stable argsort is a linear-time radix sort.
    """
    limit = int(np.sqrt(np.iinfo(np.int16).max))
    block = max(block, -(-max(n_a, n_b) // limit))
    n_cols = -(-n_b // block)
    key = (ia // block).astype(np.int16) * np.int16(n_cols) + (ib // block).astype(np.int16)
    return np.argsort(key, kind="stable")


def score_pairs_gather(
    feats_a: np.ndarray,
    ia: np.ndarray,
    ib: np.ndarray,
    pair_score: Callable = cosine_rows,
    unc_a: np.ndarray | None = None,
    feats_b: np.ndarray | None = None,
    unc_b: np.ndarray | None = None,
    chunk: int = DEFAULT_CHUNK,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Score pairs (feats_a[ia], feats_b[ib]) by gathering rows chunk by chunk.

    Many pairs are visited in :func:`locality_order` (results are written back in input order).
    """
    feats_b = feats_a if feats_b is None else feats_b
    unc_b = unc_a if unc_b is None else unc_b
    ia, ib = _check_indices(ia, ib, feats_a.shape[0], feats_b.shape[0])
    out = np.empty(ia.shape[0], dtype=np.float64) if out is None else out
    order = None
    if ia.shape[0] >= 8 * chunk:
        order = locality_order(ia, ib, feats_a.shape[0], feats_b.shape[0])
    for s in range(0, ia.shape[0], chunk):
        sel = slice(s, s + chunk) if order is None else order[s : s + chunk]
        a, b = ia[sel], ib[sel]
        ua = None if unc_a is None else unc_a[a]
        ub = None if unc_b is None else unc_b[b]
        out[sel] = pair_score(feats_a[a], ua, feats_b[b], ub)
    return out


def _band_order(band_of_pair: np.ndarray, n_bands: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs grouped by band: (order, bounds) with pairs of band g at order[bounds[g]:bounds[g+1]]."""
    # 16-bit keys let numpy's stable argsort use a linear-time radix sort
    kdtype = np.int16 if n_bands <= np.iinfo(np.int16).max else np.int64
    key = band_of_pair.astype(kdtype)
    order = np.argsort(key, kind="stable")
    bounds = np.zeros(n_bands + 1, dtype=np.int64)
    np.cumsum(np.bincount(key, minlength=n_bands), out=bounds[1:])
    return order, bounds


def score_pairs_blocked(
    feats_a: np.ndarray,
    ia: np.ndarray,
    ib: np.ndarray,
    feats_b: np.ndarray | None = None,
    from_cos: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
    scal_a: np.ndarray | None = None,
    scal_b: np.ndarray | None = None,
    band_bytes: int = DEFAULT_BAND_BYTES,
    dense_fraction: float = DENSE_FRACTION,
    chunk: int = DEFAULT_CHUNK,
) -> np.ndarray:
    """Scores from dot products ``feats_a[ia]·feats_b[ib]`` via template×template products.

    The rows and columns that occur in some pair are compacted; the row set is cut into bands so
    that one band's score matrix against all needed columns fits in ``band_bytes``; each band whose
    pairs fill at least ``dense_fraction`` of that matrix is scored by one GEMM and a read of the
    needed entries, sparser bands by gathering rows. ``from_cos(dot, scal_a, scal_b)`` turns dot
    products into the final score using per-row scalars (e.g. ProbFace σ²); without it the dot
    product is the score (the cosine for unit rows).
    """
    feats_b = feats_a if feats_b is None else feats_b
    scal_b = scal_a if scal_b is None else scal_b
    ia, ib = _check_indices(ia, ib, feats_a.shape[0], feats_b.shape[0])
    out = np.empty(ia.shape[0], dtype=np.float64)
    if ia.shape[0] == 0:
        return out
    rows = np.flatnonzero(np.bincount(ia, minlength=feats_a.shape[0]))
    cols = np.flatnonzero(np.bincount(ib, minlength=feats_b.shape[0]))
    row_pos = np.zeros(feats_a.shape[0], dtype=np.int64)
    row_pos[rows] = np.arange(rows.shape[0])
    col_pos = np.zeros(feats_b.shape[0], dtype=np.int64)
    col_pos[cols] = np.arange(cols.shape[0])
    col_feats = np.ascontiguousarray(feats_b[cols])
    itemsize = np.result_type(feats_a.dtype, feats_b.dtype).itemsize
    band = max(1, min(rows.shape[0], band_bytes // (itemsize * cols.shape[0])))
    n_bands = -(-rows.shape[0] // band)
    if n_bands == 1:
        groups = [np.arange(ia.shape[0])]
    else:
        order, bounds = _band_order(row_pos[ia] // band, n_bands)
        groups = [order[bounds[g] : bounds[g + 1]] for g in range(n_bands)]
    for g, sel in enumerate(groups):
        if sel.shape[0] == 0:
            continue
        band_rows = rows[g * band : (g + 1) * band]
        if sel.shape[0] >= dense_fraction * band_rows.shape[0] * cols.shape[0]:
            scores = feats_a[band_rows] @ col_feats.T  # (band, n_cols) template x template
            flat = scores.reshape(-1)
            for s in range(0, sel.shape[0], 1 << 20):
                part = sel[s : s + (1 << 20)]
                lin = (row_pos[ia[part]] - g * band) * cols.shape[0] + col_pos[ib[part]]
                out[part] = flat[lin]
            del scores, flat
        else:
            for s in range(0, sel.shape[0], chunk):
                part = sel[s : s + chunk]
                out[part] = np.einsum("ij,ij->i", feats_a[ia[part]], feats_b[ib[part]])
    if from_cos is not None:
        for s in range(0, out.shape[0], 1 << 20):
            sl = slice(s, s + (1 << 20))
            out[sl] = from_cos(out[sl], scal_a[ia[sl]], scal_b[ib[sl]])
    return out


def score_pairs(
    feats: np.ndarray,
    ia: np.ndarray,
    ib: np.ndarray,
    metric: str | PairScore = "cosine",
    unc: np.ndarray | None = None,
    feats_b: np.ndarray | None = None,
    unc_b: np.ndarray | None = None,
    chunk: int = DEFAULT_CHUNK,
    band_bytes: int = DEFAULT_BAND_BYTES,
    from_cos: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Score pairs of rows of a feature table: cosine, a ``pair_score`` callable, or ``from_cos``.

    ``metric="cosine"`` (rows must be unit length) with ``from_cos`` turns each dot product and the
    two rows' scalar ``unc`` into the score (template × template GEMM); a callable ``metric`` is
    applied to gathered rows. ``"mls"`` / ``"mls_scalar"`` are shorthands for the registered PFE /
    ProbFace scores (per-dimension σ² in ``unc`` / unit rows with one σ² each). Memory is O(chunk·D + pairs).
    """
    if callable(metric):
        return score_pairs_gather(feats, ia, ib, metric, unc, feats_b, unc_b, chunk)
    if metric == "mls":
        if unc is None or np.shape(unc) != np.shape(feats):
            raise ValueError(f"mls needs per-dimension σ² shaped like the features {np.shape(feats)}")
        pfe_score = numpy_callable(_registered("pfe").pair_score)  # wrapped once, not per chunk
        return score_pairs_gather(feats, ia, ib, pfe_score, unc, feats_b, unc_b, chunk=min(chunk, MLS_CHUNK))
    if metric == "mls_scalar":
        if unc is None:
            raise ValueError("mls_scalar needs one σ² per row")
        metric, from_cos = "cosine", _registered("probface").score_from_cos
    if metric != "cosine":
        raise ValueError(f"unknown metric {metric!r} (cosine, mls, mls_scalar or a callable)")
    if from_cos is None:
        return score_pairs_blocked(feats, ia, ib, feats_b, band_bytes=band_bytes, chunk=chunk)
    if unc is None:
        raise ValueError("a score from cos θ needs one uncertainty value per row")
    u_a = np.asarray(unc).reshape(-1)
    u_b = None if unc_b is None else np.asarray(unc_b).reshape(-1)
    return score_pairs_blocked(feats, ia, ib, feats_b, from_cos, u_a, u_b, band_bytes, chunk=chunk)


def _registered(name: str) -> object:
    from facepipe.uncertainty.registry import get_method  # lazy: torch

    return get_method(name)


def mls_rows(mu_a: np.ndarray, var_a: np.ndarray, mu_b: np.ndarray, var_b: np.ndarray) -> np.ndarray:
    """PFE's mutual likelihood score of gathered rows: the method's own ``pair_score``, on numpy arrays."""
    return numpy_callable(_registered("pfe").pair_score)(mu_a, var_a, mu_b, var_b)


def method_pair_scores(
    method: object, mu_a: np.ndarray, u_a: np.ndarray, mu_b: np.ndarray, u_b: np.ndarray
) -> np.ndarray:
    """A method's score of row-aligned pairs (unit μ, u as the method's head gives it), chunked.

    Uses the method's ``score_from_cos`` on row-wise dots when it has one, else its ``pair_score``.
    """
    from_cos = getattr(method, "score_from_cos", None)
    n = mu_a.shape[0]
    idx = np.arange(n)
    feats = np.concatenate([mu_a, mu_b])
    unc = np.concatenate([u_a, u_b])
    if from_cos is not None and unc.reshape(2 * n, -1).shape[1] == 1:
        return score_pairs(feats, idx, idx + n, "cosine", unc, from_cos=numpy_callable(from_cos))
    return score_pairs(feats, idx, idx + n, numpy_callable(method.pair_score), unc)


def numpy_callable(fn: Callable) -> Callable:
    """Wrap a torch function (a fusion or pair score of ``facepipe.uncertainty``) for numpy arrays.

    Arrays go in as tensors (no copy for contiguous inputs) and tensors come back as numpy arrays;
    tuples are converted element-wise, ``None`` passes through.
    """

    def to_np(x):
        if isinstance(x, tuple):
            return tuple(to_np(v) for v in x)
        return x.detach().cpu().numpy() if hasattr(x, "detach") else x

    def wrapped(*args, **kwargs):
        import torch

        targs = [torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in args]
        return to_np(fn(*targs, **kwargs))

    wrapped.__name__ = getattr(fn, "__name__", "wrapped")
    wrapped.__doc__ = fn.__doc__
    return wrapped
