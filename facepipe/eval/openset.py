"""Open-set gallery decisions (the SphereFace demo): known identity or "unknown" by a threshold.

A probe is matched to the gallery identity with the highest score; if that score is below the
threshold it is declared unknown. Error rates at a threshold t:
- ``false_accept``: unknown probes (identity not enrolled) accepted as someone;
- ``false_reject``: known probes declared unknown;
- ``misidentify``: known probes accepted but given the wrong identity;
- ``correct``: known probes accepted with the right identity.
``sweep`` computes them for every threshold at once from sorted best scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNKNOWN = -1


@dataclass
class OpenSetDecisions:
    best_score: np.ndarray
    best_identity: np.ndarray
    known: np.ndarray  # probe's identity is enrolled
    correct_identity: np.ndarray  # best gallery identity is the probe's


def decide_inputs(
    probe_feats: np.ndarray,
    probe_ids: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_ids: np.ndarray,
    chunk: int = 1024,
) -> OpenSetDecisions:
    """Best gallery match of each probe (dot-product score), in probe chunks."""
    probe_ids = np.asarray(probe_ids).reshape(-1)
    gallery_ids = np.asarray(gallery_ids).reshape(-1)
    best = np.empty(probe_ids.shape[0])
    ident = np.empty(probe_ids.shape[0], dtype=gallery_ids.dtype)
    for s in range(0, probe_ids.shape[0], chunk):
        sc = probe_feats[s : s + chunk] @ gallery_feats.T
        j = np.argmax(sc, axis=1)
        best[s : s + chunk] = sc[np.arange(j.shape[0]), j]
        ident[s : s + chunk] = gallery_ids[j]
    known = np.isin(probe_ids, gallery_ids)
    return OpenSetDecisions(best, ident, known, known & (ident == probe_ids))


def predict(dec: OpenSetDecisions, threshold: float) -> np.ndarray:
    """Predicted identity per probe, ``UNKNOWN`` when the best score is below the threshold."""
    return np.where(dec.best_score >= threshold, dec.best_identity, UNKNOWN)


def rates(dec: OpenSetDecisions, threshold: float) -> dict[str, float]:
    """Error rates at one threshold (a probe is accepted when best score >= threshold)."""
    out = sweep(dec, np.array([threshold]))
    return {k: float(v[0]) for k, v in out.items() if k != "threshold"} | {"threshold": float(threshold)}


def sweep(dec: OpenSetDecisions, thresholds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Error rates for many thresholds (default: every distinct best score), vectorised."""
    if thresholds is None:
        thresholds = np.unique(dec.best_score)
    thresholds = np.asarray(thresholds, dtype=np.float64)

    def accepted(mask: np.ndarray) -> np.ndarray:
        s = np.sort(dec.best_score[mask])
        return s.shape[0] - np.searchsorted(s, thresholds, side="left")

    n_known, n_unknown = int(dec.known.sum()), int((~dec.known).sum())
    acc_known = accepted(dec.known)
    acc_correct = accepted(dec.correct_identity)
    acc_unknown = accepted(~dec.known)

    def frac(num: np.ndarray, den: int) -> np.ndarray:
        return num / den if den else np.full(num.shape, np.nan)

    return {
        "threshold": thresholds,
        "false_accept": frac(acc_unknown, n_unknown),
        "false_reject": frac(n_known - acc_known, n_known),
        "misidentify": frac(acc_known - acc_correct, n_known),
        "correct": frac(acc_correct, n_known),
    }


def threshold_at_false_accept(dec: OpenSetDecisions, target: float) -> float:
    """Lowest threshold whose unknown-probe false-accept rate is <= target."""
    s = np.sort(dec.best_score[~dec.known])[::-1]
    if s.shape[0] == 0:
        raise ValueError("no unknown probes to set a threshold on")
    k = int(np.floor(target * s.shape[0]))
    # accept when score >= thr: thr just above the (k+1)-th highest unknown score
    return float(np.nextafter(s[k], np.inf)) if k < s.shape[0] else float(-np.inf)
