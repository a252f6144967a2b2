"""Error-versus-Discard Characteristic (EDC) of ISO/IEC 29794-1:2024, vectorised for millions of pairs.

Setting: N comparisons with a similarity ``score`` (higher = more alike), a genuine/impostor label and a
*pair quality* (higher = better). Per-image quality is −uncertainty (or a baseline such as the feature
norm); a comparison is only as good as its worse image, so ``pair quality = min(q_a, q_b)``.

Definitions used here (all in float64):

* **Threshold.** Fixed once, on *all* comparisons, at the target FMR α: with ``n_I`` impostor scores
  sorted in decreasing order ``s_(1) ≥ s_(2) ≥ …`` and ``k = ⌊α·n_I⌋``, a comparison is a *match* iff
  ``score > τ`` with ``τ = s_(k+1)`` (``τ = −∞`` when ``k ≥ n_I``). This is the lowest threshold whose
  FMR does not exceed α, so the realised FMR at zero discard is ≤ α (ties at τ all count as non-matches).
* **Discarding, ties.** Comparisons are ranked by pair quality, lowest first, and only *whole tie groups*
  are discarded: for a requested fraction x the discarded set is the union of the lowest-quality groups
  whose cumulative size c satisfies ``c ≤ x·N + 1e-9`` (the slack absorbs float rounding of x·N when x
  was itself computed as c/N). So the realised discard count is
  never above the request, the result does not depend on the order of tied pairs, and the curve is a
  right-continuous step function of x that only changes at the realisable fractions ``c_j / N``.
* **Population.** N is all comparisons by default. :func:`edc_report` with ``population="mated"`` draws
  the FNMR-EDC the way ISO/IEC 29794-1 does: fractions, discards and FNMR over the mated comparisons
  only (its ideal curve is then ``max(0, (FNMR₀ − x)/(1 − x))`` up to the step rule), and the FMR column
  discards the same fraction of the non-mated comparisons.
* **Error rates of the rest.** FNMR = false non-matches / genuine comparisons among those kept, FMR =
  false matches / impostors kept; a rate over an empty set is 0 (no error can be made).
* **pAUC.** The exact integral of that step function from 0 to the discard limit L:
  ``Σ_j FNMR(c_j/N) · (min(c_{j+1}/N, L) − c_j/N)`` over the realisable points ``c_j/N < L``. It does not
  depend on any plotting grid; the grid values are samples of the same step function.
* **Ideal curve.** The best any quality can do: it discards the false non-matches first, one comparison
  at a time (no ties), so after m = ⌊x·N⌋ discards ``FNMR = max(F − m, 0) / (G − min(m, F))`` with F the
  false non-matches and G the genuine comparisons at zero discard; its pAUC uses the same rule (steps
  of 1/N).
* **Random discard.** Discarding uniformly at random keeps both rates unchanged in expectation, so the
  random line is the horizontal line at the zero-discard FNMR (a seeded random quality gives one draw).

Memory is linear in N (one stable argsort, then per-tie-group counts); nothing is quadratic, so IJB-C's
15.6M pairs fit in a few hundred MB. :func:`pair_quality` works chunk by chunk for image tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict, Unpack

import numpy as np

DEFAULT_FMR_TARGETS = (1e-3, 1e-4)
DEFAULT_DISCARD_LIMIT = 0.2
DEFAULT_GRID_POINTS = 101  # samples of each step curve in reports/plots (0 .. discard_max)
PAIR_CHUNK = 1 << 20
POPULATIONS = ("all", "mated")  # what a discard fraction is a fraction of (see edc_report)
COUNT_SLACK = 1e-9  # c ≤ x·N + slack: x = c/N must discard exactly c despite rounding


def pair_quality(quality: np.ndarray, ia: np.ndarray, ib: np.ndarray, chunk: int = PAIR_CHUNK) -> np.ndarray:
    """Pair quality ``min(quality[ia], quality[ib])`` gathered ``chunk`` pairs at a time."""
    q = np.asarray(quality, dtype=np.float64).reshape(-1)
    ia, ib = np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64)
    out = np.empty(ia.shape[0], dtype=np.float64)
    for s in range(0, ia.shape[0], chunk):
        np.minimum(q[ia[s : s + chunk]], q[ib[s : s + chunk]], out=out[s : s + chunk])
    return out


def threshold_at_fmr(scores: np.ndarray, issame: np.ndarray, fmr_target: float) -> float:
    """τ such that ``score > τ`` is a match and FMR(τ) ≤ ``fmr_target`` is as large as possible."""
    impostor = np.asarray(scores, dtype=np.float64)[~np.asarray(issame, dtype=bool)]
    k = int(np.floor(fmr_target * impostor.shape[0]))
    if k >= impostor.shape[0]:
        return -np.inf
    # the (k+1)-th largest = the (n-k-1)-th smallest; partition is O(n), no full sort
    return float(np.partition(impostor, impostor.shape[0] - k - 1)[impostor.shape[0] - k - 1])


def rank_quality(quality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): comparisons by increasing quality and where each tie group begins in that order."""
    quality = np.asarray(quality, dtype=np.float64).reshape(-1)
    order = np.argsort(quality, kind="stable")
    q_sorted = quality[order]
    starts = np.flatnonzero(np.concatenate(([True], q_sorted[1:] != q_sorted[:-1])))
    return order, starts


def _rate(errors: np.ndarray, total: np.ndarray) -> np.ndarray:
    return np.divide(errors, total, out=np.zeros(errors.shape, dtype=np.float64), where=total > 0)


@dataclass
class EDCResult:
    """One EDC at one FMR target; the ``*_at`` arrays are the step curve sampled at ``discard``."""

    fmr_target: float
    threshold: float
    discard_limit: float
    realisable: np.ndarray  # c_j / N: where the step curve changes (up to the first past the range)
    fnmr_steps: np.ndarray  # FNMR after discarding c_j comparisons
    fmr_steps: np.ndarray  # FMR of the same population (`fmr` is the reported, sampled FMR)
    discard: np.ndarray  # the requested fractions
    discarded: np.ndarray  # the realised fraction per request (whole tie groups, never more)
    fnmr: np.ndarray
    fmr: np.ndarray
    pauc: float

    def metrics(self) -> dict:
        return {
            "fmr_target": self.fmr_target,
            "threshold": self.threshold,
            "discard_limit": self.discard_limit,
            "discard_fractions": self.discard.tolist(),
            "discarded_fractions": self.discarded.tolist(),
            "fnmr": self.fnmr.tolist(),
            "fmr": self.fmr.tolist(),
            "pauc": self.pauc,
        }


def step_value(realisable: np.ndarray, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The right-continuous step function through (realisable[j], values[j]) evaluated at ``x``."""
    return values[np.searchsorted(realisable, np.asarray(x, dtype=np.float64), side="right") - 1]


def step_area(realisable: np.ndarray, values: np.ndarray, limit: float) -> float:
    """Exact ∫_0^limit of the step function (the pAUC rule of the module docstring)."""
    ends = np.minimum(np.append(realisable[1:], np.inf), limit)
    width = np.clip(ends - realisable, 0.0, None)
    return float(np.dot(values, width))


def edc(
    scores: np.ndarray,
    issame: np.ndarray,
    quality: np.ndarray,
    fmr_target: float,
    discard_limit: float = DEFAULT_DISCARD_LIMIT,
    discard: Sequence[float] | np.ndarray | None = None,
    threshold: float | None = None,
    ranking: tuple[np.ndarray, np.ndarray] | None = None,
) -> EDCResult:
    """EDC of one pair-quality vector at one FMR target (see the module docstring for every rule).

    ``discard``: the requested fractions to sample (default: 101 points from 0 to ``discard_limit``).
    ``threshold``: reuse a τ already computed for these scores (it depends on scores and α only).
    ``ranking``: reuse :func:`rank_quality` of ``quality`` (the sort is the expensive step).
    """
    quality = np.asarray(quality, dtype=np.float64).reshape(-1)
    scores, issame, tau, grid, upto = _setup(scores, issame, fmr_target, discard_limit, discard, threshold)
    n = scores.shape[0]
    if quality.shape[0] != n:
        raise ValueError(f"scores ({n}), labels ({issame.shape[0]}) and quality ({quality.shape[0]}) differ")
    if np.isnan(quality).any():
        raise ValueError("scores and quality must not be NaN")
    match = scores > tau
    order, starts = rank_quality(quality) if ranking is None else ranking
    # only the groups that start within the largest fraction asked for matter, plus the next boundary:
    # per-group arrays then cover ~that fraction of N (memory at IJB-C scale)
    k = int(np.searchsorted(starts, upto * n + COUNT_SLACK, side="right"))
    cut = int(starts[k]) if k < starts.shape[0] else n
    counts = np.append(starts[:k], cut)  # c_0 = 0 .. c_k, the first realisable count past the range
    head = order[:cut]
    flags = (issame & ~match, ~issame & match, issame)
    # kept after discarding the first j groups = total − the counts of those groups (cumulative sums of
    # the 1-byte indicators in quality order, per tie group)
    kept_fnm, kept_fm, kept_gen = (
        f.sum() - np.concatenate(([0], np.cumsum(np.add.reduceat(f[head], starts[:k], dtype=np.int64))))
        for f in flags
    )
    kept_imp = (n - counts) - kept_gen
    steps = (_rate(kept_fnm, kept_gen), _rate(kept_fm, kept_imp))
    return _sampled(fmr_target, tau, discard_limit, counts, n, steps, grid)


def _setup(
    scores: np.ndarray,
    issame: np.ndarray,
    fmr_target: float,
    discard_limit: float,
    discard: Sequence[float] | np.ndarray | None,
    threshold: float | None,
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, float]:
    """What every EDC starts from: checked float64 scores and labels, the threshold τ at the FMR target,
    the sampled discard fractions and how far the curve must be computed (the limit or the grid's end)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    n = scores.shape[0]
    if issame.shape[0] != n:
        raise ValueError(f"scores ({n}) and labels ({issame.shape[0]}) differ")
    if n == 0:
        raise ValueError("no comparisons")
    if np.isnan(scores).any():
        raise ValueError("scores and quality must not be NaN")
    if not 0.0 < discard_limit <= 1.0:
        raise ValueError(f"discard limit must lie in (0, 1], got {discard_limit}")
    tau = threshold_at_fmr(scores, issame, fmr_target) if threshold is None else float(threshold)
    grid = _grid(discard, discard_limit)
    return scores, issame, tau, grid, max(discard_limit, float(grid.max()) if grid.size else 0.0)


def _grid(discard: Sequence[float] | np.ndarray | None, discard_limit: float) -> np.ndarray:
    grid = np.linspace(0.0, discard_limit, DEFAULT_GRID_POINTS) if discard is None else discard
    grid = np.asarray(grid, dtype=np.float64).reshape(-1)
    if grid.size and (grid.min() < 0.0 or grid.max() > 1.0):
        raise ValueError("discard fractions must lie in [0, 1]")
    return grid


def _sampled(
    fmr_target: float,
    tau: float,
    discard_limit: float,
    counts: np.ndarray,
    n: int,
    steps: tuple[np.ndarray, np.ndarray],
    grid: np.ndarray,
) -> EDCResult:
    """The result of step curves (FNMR, FMR after discarding counts[j] comparisons), sampled at grid."""
    realisable = counts / n
    j = np.searchsorted(counts.astype(np.float64), grid * n + COUNT_SLACK, side="right") - 1
    return EDCResult(
        fmr_target=float(fmr_target),
        threshold=tau,
        discard_limit=float(discard_limit),
        realisable=realisable,
        fnmr_steps=steps[0],
        fmr_steps=steps[1],
        discard=grid,
        discarded=realisable[j],
        fnmr=steps[0][j],
        fmr=steps[1][j],
        pauc=step_area(realisable, steps[0], discard_limit),
    )


class CurveOptions(TypedDict, total=False):
    """How `ideal_edc` samples its curve, as `edc` takes them (`discard_limit`, `discard`, `threshold`)."""

    discard_limit: float
    discard: Sequence[float] | np.ndarray | None
    threshold: float | None


def ideal_edc(
    scores: np.ndarray, issame: np.ndarray, fmr_target: float, **options: Unpack[CurveOptions]
) -> EDCResult:
    """The ideal (oracle) FNMR-EDC: false non-matches discarded first, one comparison at a time."""
    limit = options.get("discard_limit", DEFAULT_DISCARD_LIMIT)
    sampled = (options.get("discard"), options.get("threshold"))
    scores, issame, tau, grid, upto = _setup(scores, issame, fmr_target, limit, *sampled)
    n = scores.shape[0]
    match = scores > tau
    false_nm, genuine = int((issame & ~match).sum()), int(issame.sum())
    fm, impostor = int((~issame & match).sum()), int((~issame).sum())
    # only the discard counts up to the limit (or the grid's end), plus one, matter
    m = np.arange(0, min(n, int(np.floor(upto * n)) + 1) + 1)
    removed_fnm = np.minimum(m, false_nm)
    fnmr_steps = _rate(false_nm - removed_fnm, genuine - removed_fnm)
    # the ideal order is defined for FNMR only; its FMR is reported at the zero-discard value
    fmr_steps = np.full(m.shape, fm / impostor if impostor else 0.0)
    return _sampled(fmr_target, tau, limit, m, n, (fnmr_steps, fmr_steps), grid)


def edc_report(
    scores: np.ndarray,
    issame: np.ndarray,
    qualities: dict[str, np.ndarray],
    fmr_targets: Sequence[float] = DEFAULT_FMR_TARGETS,
    discard_limit: float = DEFAULT_DISCARD_LIMIT,
    discard_max: float | None = None,
    population: str = "all",
) -> dict[str, dict]:
    """EDCs of several pair qualities on the same comparisons, keyed ``"fmr=<α>"`` → method → result.

    Besides the methods, every target gets ``"ideal"`` (:func:`ideal_edc`) and ``"random_expected"``
    (the flat line at the zero-discard FNMR). Curves are sampled from 0 to ``discard_max`` (default:
    the discard limit); pAUC always integrates up to ``discard_limit``.

    ``population``: ``"all"`` discards a fraction of all comparisons (FNMR and FMR of what is kept);
    ``"mated"`` is the FNMR-EDC as ISO/IEC 29794-1 draws it: the fraction, the discards and the FNMR
    are over the mated comparisons only, and the FMR column discards the same fraction of the
    non-mated comparisons. The threshold is fixed on all comparisons in both.
    """
    if population not in POPULATIONS:
        raise ValueError(f"population must be one of {POPULATIONS}, got {population!r}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    grid = np.linspace(0.0, discard_max or discard_limit, DEFAULT_GRID_POINTS)
    # "all": one population; "mated": FNMR over the mated comparisons, FMR over the non-mated ones
    masks = [None] if population == "all" else [m for m in (issame, ~issame) if m.any()]
    if population == "mated" and not issame.any():
        raise ValueError("no mated comparisons: the mated FNMR-EDC is undefined")

    def part(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        return x if mask is None else x[mask]

    rankings = {
        (name, i): rank_quality(part(q, m)) for name, q in qualities.items() for i, m in enumerate(masks)
    }
    out: dict[str, dict] = {}
    for alpha in fmr_targets:
        tau = threshold_at_fmr(scores, issame, alpha)
        per: dict[str, EDCResult] = {}
        for name, q in qualities.items():
            runs = [
                edc(
                    part(scores, m),
                    part(issame, m),
                    part(q, m),
                    alpha,
                    discard_limit,
                    grid,
                    tau,
                    rankings[name, i],
                )
                for i, m in enumerate(masks)
            ]
            per[name] = runs[0]
            per[name].fmr = runs[-1].fmr  # FMR of the non-mated comparisons kept ("mated" population)
        ideal = ideal_edc(
            part(scores, masks[0]),
            part(issame, masks[0]),
            alpha,
            discard_limit=discard_limit,
            discard=grid,
            threshold=tau,
        )
        if population == "mated":  # the ideal order leaves the non-mated comparisons alone
            fmr0 = float(np.mean(scores[~issame] > tau)) if (~issame).any() else 0.0
            ideal.fmr_steps = np.full(ideal.fmr_steps.shape, fmr0)
            ideal.fmr = np.full(grid.shape, fmr0)
        per["ideal"] = ideal
        per["random_expected"] = _flat_line(ideal, grid)
        out[f"fmr={alpha:g}"] = per
    return out


def _flat_line(ideal: EDCResult, grid: np.ndarray) -> EDCResult:
    """Random discard in expectation: both rates stay at their zero-discard values."""
    fnmr0, fmr0 = float(ideal.fnmr_steps[0]), float(ideal.fmr_steps[0])
    return EDCResult(
        fmr_target=ideal.fmr_target,
        threshold=ideal.threshold,
        discard_limit=ideal.discard_limit,
        realisable=np.zeros(1),
        fnmr_steps=np.array([fnmr0]),
        fmr_steps=np.array([fmr0]),
        discard=grid,
        discarded=grid,
        fnmr=np.full(grid.shape, fnmr0),
        fmr=np.full(grid.shape, fmr0),
        pauc=fnmr0 * ideal.discard_limit,
    )
