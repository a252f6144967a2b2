"""Risk-controlled accuracy: ProbFace parity (case 06) and brute-force checks of the threshold search."""

from __future__ import annotations

import re

import numpy as np
import pytest

from facepipe.eval import risk as R
from facepipe.eval.verification import kfold_slices


@pytest.mark.golden
@pytest.mark.parametrize("how", ["max", "add"])
def test_case06_risk_controlled_accuracy(golden_dir, how):
    d = np.load(golden_dir / "case06_probface.npz", allow_pickle=False)
    p = f"risk_{how}__"
    r = R.risk_from_interleaved(
        d["risk_embeddings"],
        d["risk_issame"],
        d["risk_sigma_sq"],
        how=how,
        rejection_rates=tuple(d[p + "risk_factors"]),
    )
    errs = {
        "accuracy": np.max(np.abs(r.accuracy.astype(np.float64) - d[p + "accuracy"])),
        "threshold": np.max(np.abs(r.threshold.astype(np.float64) - d[p + "threshold"])),
        "risk_threshold_rel": np.max(np.abs(r.risk_threshold / d[p + "risk_threshold"] - 1)),
    }
    print(f"case06 risk_{how}: largest errors {errs}")
    np.testing.assert_array_equal(r.accuracy, d[p + "accuracy"])  # exact: float32 ratio of counts
    assert errs["threshold"] <= 1e-6
    np.testing.assert_array_equal(r.n_kept, d[p + "n_kept"])
    assert errs["risk_threshold_rel"] <= 1e-6
    # the report string the reference returned carries the same numbers at %f precision
    report = str(d[p + "report_string"])
    rows = re.findall(r"keep_idxes (\d+) / (\d+) Cosine score acc ([\d.]+) threshold ([\d.]+)", report)
    assert len(rows) == 4
    for (kept, total, acc, thr), n, a, t in zip(rows, r.n_kept, r.accuracy, r.threshold, strict=True):
        assert int(kept) == n and int(total) == r.n_total
        assert acc == f"{a:f}" and thr == f"{t:f}"


def _brute_accuracy(score, label):
    """metrics.accuracy of PFE/ProbFace, as a loop over sorted genuine scores."""
    thresholds = np.sort(score[label])
    accs = np.array([np.mean((score >= t) == label) for t in thresholds])
    best = accs.max()
    return best, np.mean(thresholds[accs == best])


def test_positive_candidate_search_matches_loop():
    rng = np.random.default_rng(0)
    for n in (50, 333, 1000):
        label = rng.random(n) < 0.5
        score = np.round(np.where(label, rng.normal(0.5, 0.2, n), rng.normal(0.1, 0.2, n)), 2).astype(
            np.float32
        )
        acc, thr = R.best_threshold_positive_candidates(score, label)
        acc2, thr2 = _brute_accuracy(score, label)
        assert acc == acc2 and thr == np.float32(thr2)


def test_kfold_on_kept_pairs_matches_loop():
    rng = np.random.default_rng(1)
    n = 1234
    label = rng.random(n) < 0.5
    score = np.where(label, rng.normal(0.5, 0.3, n), rng.normal(0.0, 0.3, n)).astype(np.float32)
    acc, thr, accs, thrs = R.kfold_accuracy_positive_candidates(score, label)
    for f, sl in enumerate(kfold_slices(n, 10)):
        train = np.setdiff1d(np.arange(n), np.arange(n)[sl])
        _, t = _brute_accuracy(score[train], label[train])
        assert thrs[f] == np.float32(t)
        assert accs[f] == np.float32(np.mean((score[sl] >= np.float32(t)) == label[sl]))
    assert acc == np.mean(accs) and thr == np.mean(thrs)


def test_rejecting_uncertain_pairs_helps_when_uncertainty_is_informative():
    rng = np.random.default_rng(2)
    n = 4000
    label = rng.random(n) < 0.5
    unc = rng.uniform(0.05, 2.0, n)  # e.g. 1/κ: noise grows with it
    score = np.where(label, 0.6, 0.0) + rng.normal(0, 1, n) * unc * 0.3
    r = R.risk_controlled_accuracy(score, label, unc, (0.0, 0.2, 0.5))
    assert r.n_kept.tolist() == [4000, 3200, 2000]
    assert r.accuracy[0] < r.accuracy[1] < r.accuracy[2]


def test_pair_uncertainty_variants():
    a = np.array([[1.0], [4.0]])
    b = np.array([[2.0], [3.0]])
    np.testing.assert_array_equal(R.pair_uncertainty(a, b, "max"), [2.0, 4.0])
    np.testing.assert_array_equal(R.pair_uncertainty(a, b, "add"), [3.0, 7.0])
    per_dim = np.array([[1.0, 3.0], [2.0, 2.0]])  # per-dimension σ²: each image's mean
    np.testing.assert_array_equal(R.pair_uncertainty(per_dim, per_dim[::-1], "max"), [2.0, 2.0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ"):
        R.risk_controlled_accuracy(np.zeros(10), np.zeros(10, bool), np.zeros(9))
    with pytest.raises(ValueError, match="rejection"):
        R.risk_controlled_accuracy(np.zeros(20), np.ones(20, bool), np.ones(20), (1.0,))
    with pytest.raises(ValueError, match="NaN"):
        R.risk_controlled_accuracy(np.zeros(20), np.ones(20, bool), np.r_[np.ones(19), np.nan])
