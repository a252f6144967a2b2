"""1:N identification: closed-set CMC (rank-k identification rate) and open-set TPIR@FPIR.

Searches are scored against the gallery in probe chunks, so a P×G score matrix never has to fit
in memory. Definitions (NIST FRVT style):
- a probe is *mated* when its identity has an entry in the gallery;
- its rank is 1 + the number of gallery entries scoring strictly higher than its best mate
  (ties are resolved in the probe's favour);
- CMC(k) = fraction of mated probes with rank <= k;
- FPIR(t) = fraction of non-mated probes whose top score is > t; TPIR(t) = fraction of mated
  probes with rank <= R and best-mate score > t. For an FPIR level f, t is the highest value that
  still keeps FPIR <= f (the (⌊f·N⌋+1)-th highest non-mated top score).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_RANKS = (1, 5, 10)
DEFAULT_FPIR = (1e-3, 1e-2, 1e-1)


@dataclass
class SearchResult:
    """Per probe: rank of the best mate (0 for non-mated), best mate score, top score overall."""

    rank: np.ndarray
    mate_score: np.ndarray
    top_score: np.ndarray
    mated: np.ndarray


def search(
    probe_feats: np.ndarray,
    probe_ids: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_ids: np.ndarray,
    score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    chunk: int = 1024,
) -> SearchResult:
    """Search every probe against the gallery. ``score_fn(P_chunk, G) -> (p, g)`` defaults to dot."""
    probe_ids = np.asarray(probe_ids).reshape(-1)
    gallery_ids = np.asarray(gallery_ids).reshape(-1)
    if probe_feats.shape[0] != probe_ids.shape[0] or gallery_feats.shape[0] != gallery_ids.shape[0]:
        raise ValueError("feature rows and identity labels differ in count")
    score_fn = score_fn or (lambda p, g: p @ g.T)
    n = probe_ids.shape[0]
    rank = np.zeros(n, dtype=np.int64)
    mate = np.full(n, -np.inf)
    top = np.empty(n)
    mated = np.isin(probe_ids, gallery_ids)
    for s in range(0, n, chunk):
        sc = np.asarray(score_fn(probe_feats[s : s + chunk], gallery_feats), dtype=np.float64)
        is_mate = probe_ids[s : s + chunk, None] == gallery_ids[None, :]
        best_mate = np.where(is_mate, sc, -np.inf).max(axis=1)
        top[s : s + chunk] = sc.max(axis=1)
        mate[s : s + chunk] = best_mate
        higher = (sc > best_mate[:, None]).sum(axis=1)
        rank[s : s + chunk] = np.where(mated[s : s + chunk], higher + 1, 0)
    return SearchResult(rank, mate, top, mated)


def cmc(result: SearchResult, ranks: tuple[int, ...] = DEFAULT_RANKS) -> dict[int, float]:
    """Rank-k identification rate over the mated probes."""
    r = result.rank[result.mated]
    if r.shape[0] == 0:
        raise ValueError("no probe has a mate in the gallery")
    return {int(k): float(np.mean(r <= k)) for k in ranks}


def tpir_at_fpir(
    result: SearchResult, fpir_levels: tuple[float, ...] = DEFAULT_FPIR, rank: int = 1
) -> dict[float, dict[str, float]]:
    """Open-set TPIR at each FPIR level (needs non-mated probes), with its threshold and real FPIR."""
    nm = np.sort(result.top_score[~result.mated])[::-1]
    if nm.shape[0] == 0:
        raise ValueError("open-set evaluation needs probes whose identity is not in the gallery")
    m_rank, m_score = result.rank[result.mated], result.mate_score[result.mated]
    out = {}
    for f in fpir_levels:
        k = int(np.floor(f * nm.shape[0]))
        thr = nm[k] if k < nm.shape[0] else -np.inf
        out[float(f)] = {
            "tpir": float(np.mean((m_rank <= rank) & (m_score > thr))) if m_rank.shape[0] else float("nan"),
            "threshold": float(thr),
            "fpir": float(np.mean(nm > thr)),
        }
    return out
