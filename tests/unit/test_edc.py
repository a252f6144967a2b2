"""EDC / pAUC against a brute-force count on small random data (ties in scores and quality included)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facepipe.eval.edc import edc, edc_report, ideal_edc, pair_quality, threshold_at_fmr

TOL = 1e-12


def brute_threshold(scores, issame, alpha):
    """Smallest τ among {−∞} ∪ scores with FMR(score > τ) ≤ α, by trying every candidate."""
    impostor = [s for s, g in zip(scores, issame, strict=True) if not g]
    for t in [-math.inf, *sorted(set(scores))]:
        false_matches = sum(1 for s in impostor if s > t)
        if not impostor or false_matches <= alpha * len(impostor):
            return t
    raise AssertionError("the largest score always has FMR 0")


def brute_rates(scores, issame, quality, tau, x):
    """Discard whole tie groups of lowest quality while the total stays ≤ x·N; count the errors left."""
    n = len(scores)
    discarded = set()
    for q in sorted(set(quality)):
        group = [i for i in range(n) if quality[i] == q]
        if len(discarded) + len(group) > x * n + 1e-9:  # the documented slack for x = c/N
            break
        discarded.update(group)
    kept = [i for i in range(n) if i not in discarded]
    gen = [i for i in kept if issame[i]]
    imp = [i for i in kept if not issame[i]]
    fnmr = sum(1 for i in gen if scores[i] <= tau) / len(gen) if gen else 0.0
    fmr = sum(1 for i in imp if scores[i] > tau) / len(imp) if imp else 0.0
    return fnmr, fmr, len(discarded) / n


def brute_pauc(scores, issame, quality, tau, limit):
    """∫_0^limit of the step curve: value after each whole group times the width to the next group."""
    n = len(scores)
    sizes = [sum(1 for q in quality if q == v) for v in sorted(set(quality))]
    points = [0]
    for size in sizes:
        points.append(points[-1] + size)
    area = 0.0
    for j, c in enumerate(points[:-1]):
        if c / n >= limit:
            break
        fnmr, _, realised = brute_rates(scores, issame, quality, tau, c / n)
        assert realised == c / n
        area += fnmr * (min(points[j + 1] / n, limit) - c / n)
    return area


small_data = st.integers(min_value=1, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(-4, 4), min_size=n, max_size=n),  # few values: ties in scores
        st.lists(st.booleans(), min_size=n, max_size=n),
        st.lists(st.integers(0, 6), min_size=n, max_size=n),  # few values: ties in quality
    )
)


@settings(max_examples=150, deadline=None)
@given(
    data=small_data,
    alpha=st.sampled_from([0.0, 1e-3, 0.05, 0.1, 0.25, 0.5, 1.0]),
    limit=st.sampled_from([0.05, 0.2, 0.37, 1.0]),
    grid_end=st.sampled_from([0.1, 0.5, 1.0]),  # below 1: only part of the curve is computed
)
def test_edc_matches_brute_force(data, alpha, limit, grid_end):
    raw_scores, labels, raw_quality = data
    scores = [s / 4 for s in raw_scores]
    quality = [q / 3 for q in raw_quality]
    tau = brute_threshold(scores, labels, alpha)
    assert threshold_at_fmr(np.array(scores), np.array(labels), alpha) == tau
    grid = np.linspace(0.0, grid_end, 41)
    res = edc(np.array(scores), np.array(labels), np.array(quality), alpha, limit, grid)
    for k, x in enumerate(grid):
        fnmr, fmr, realised = brute_rates(scores, labels, quality, tau, x)
        assert abs(res.fnmr[k] - fnmr) <= TOL and abs(res.fmr[k] - fmr) <= TOL
        assert abs(res.discarded[k] - realised) <= TOL and res.discarded[k] <= x + TOL
    assert abs(res.pauc - brute_pauc(scores, labels, quality, tau, limit)) <= TOL


@settings(max_examples=100, deadline=None)
@given(data=small_data, alpha=st.sampled_from([0.0, 0.1, 0.3]), limit=st.sampled_from([0.1, 0.5, 1.0]))
def test_ideal_curve_is_the_brute_force_of_an_ideal_quality(data, alpha, limit):
    """The closed form equals the brute-force EDC of a quality that ranks each false non-match lowest."""
    raw_scores, labels, _ = data
    scores = np.array(raw_scores, dtype=np.float64)
    issame = np.array(labels)
    tau = brute_threshold(list(scores), labels, alpha)
    false_nm = issame & (scores <= tau)
    # distinct values (no ties): false non-matches first, then everything else
    quality = list(np.arange(scores.size) + np.where(false_nm, 0, scores.size))
    grid = np.linspace(0.0, limit, 23)
    res = ideal_edc(scores, issame, alpha, discard_limit=limit, discard=grid)
    for k, x in enumerate(grid):
        fnmr, _, _ = brute_rates(list(scores), labels, quality, tau, x)
        assert abs(res.fnmr[k] - fnmr) <= TOL
    assert abs(res.pauc - brute_pauc(list(scores), labels, quality, tau, limit)) <= TOL


@settings(max_examples=100, deadline=None)
@given(data=small_data, alpha=st.sampled_from([0.0, 0.1, 0.3]), limit=st.sampled_from([0.2, 1.0]))
def test_mated_population_matches_brute_force(data, alpha, limit):
    """ISO FNMR-EDC: τ on all comparisons, fractions of the mated (FNMR) / non-mated (FMR) ones."""
    raw_scores, labels, raw_quality = data
    if not any(labels):
        return  # no mated comparisons: no FNMR-EDC
    scores, quality = [s / 4 for s in raw_scores], [q / 3 for q in raw_quality]
    tau = brute_threshold(scores, labels, alpha)
    per = edc_report(
        np.array(scores), np.array(labels), {"q": np.array(quality)}, [alpha], limit, 1.0, "mated"
    )
    res = per[f"fmr={alpha:g}"]["q"]
    mated = [i for i, g in enumerate(labels) if g]
    other = [i for i, g in enumerate(labels) if not g]
    assert res.discard[-1] == 1.0  # sampled up to discard_max
    for k, x in enumerate(res.discard):
        pick = lambda idx, x=x: brute_rates(  # noqa: E731 - the same brute force on one subset
            [scores[i] for i in idx], [labels[i] for i in idx], [quality[i] for i in idx], tau, x
        )
        fnmr, _, realised = pick(mated)
        assert abs(res.fnmr[k] - fnmr) <= TOL and abs(res.discarded[k] - realised) <= TOL
        if other:
            assert abs(res.fmr[k] - pick(other)[1]) <= TOL
    sub = [scores[i] for i in mated], [True] * len(mated), [quality[i] for i in mated]
    assert abs(res.pauc - brute_pauc(*sub, tau, limit)) <= TOL
    # the ideal curve of the standard: max(0, (FNMR₀ − x)/(1 − x)) at the realisable x = m/G
    ideal = per[f"fmr={alpha:g}"]["ideal"]
    g = len(mated)
    for x, value in zip(ideal.discarded, ideal.fnmr, strict=True):
        expected = max(0.0, (ideal.fnmr[0] - x) / (1 - x)) if x < 1 else 0.0
        assert abs(value - expected) <= 1e-9 and abs(x * g - round(x * g)) <= 1e-9


def test_tie_groups_go_together_whatever_the_order():
    rng = np.random.default_rng(3)
    n = 500
    scores = rng.normal(size=n) + 2 * (issame := rng.random(n) < 0.3)
    quality = rng.integers(0, 7, size=n).astype(float)  # 7 big tie groups
    a = edc(scores, issame, quality, 0.01, 0.3)
    perm = rng.permutation(n)
    b = edc(scores[perm], issame[perm], quality[perm], 0.01, 0.3)
    np.testing.assert_array_equal(a.fnmr, b.fnmr)
    assert a.pauc == b.pauc
    # only group boundaries are realisable, never more than requested
    sizes = np.cumsum(np.bincount(quality.astype(int)))
    assert set(np.round(a.discarded * n).astype(int)) <= {0, *sizes.tolist()}
    assert np.all(a.discarded <= a.discard + TOL)


def test_report_orders_ideal_below_informative_below_random():
    """A quality that tracks the errors beats random discard, and nothing beats the ideal curve."""
    rng = np.random.default_rng(0)
    n = 20_000
    issame = rng.random(n) < 0.2
    noise = rng.random(n)  # the degradation: hurts genuine scores
    scores = rng.normal(size=n) * 0.3 + np.where(issame, 2.0 - 2.5 * noise, 0.0)
    image_q = np.stack([-noise, -noise + 0.01 * rng.normal(size=n)], axis=1).reshape(-1)
    q = pair_quality(image_q, np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2), chunk=777)
    np.testing.assert_array_equal(q, np.minimum(image_q[0::2], image_q[1::2]))
    report = edc_report(scores, issame, {"oracle": q, "random": rng.random(n)}, (1e-2, 1e-3), 0.2, 0.5)
    for per in report.values():
        fnmr0 = per["random_expected"].fnmr[0]
        assert per["ideal"].pauc <= per["oracle"].pauc < 0.95 * per["random"].pauc
        assert per["oracle"].fnmr[40] < 0.85 * fnmr0  # after discarding 20 %
        assert per["random_expected"].pauc == pytest.approx(0.2 * fnmr0, abs=TOL)
        assert abs(per["random"].pauc - per["random_expected"].pauc) < 0.15 * per["random_expected"].pauc
        assert per["oracle"].discard[-1] == 0.5 and per["oracle"].fnmr[0] == fnmr0
        # the threshold is fixed on all comparisons: the zero-discard FMR is at most the target
        assert per["oracle"].fmr[0] <= per["oracle"].fmr_target


def test_bad_input_is_rejected():
    s, y, q = np.zeros(4), np.array([1, 0, 1, 0], bool), np.zeros(4)
    with pytest.raises(ValueError, match="differ"):
        edc(s, y, q[:3], 1e-3)
    with pytest.raises(ValueError, match="NaN"):
        edc(s, y, np.array([0, np.nan, 0, 0]), 1e-3)
    with pytest.raises(ValueError, match="discard limit"):
        edc(s, y, q, 1e-3, 0.0)
