"""InsightFace 10-fold protocol: golden parity (case 08) and brute-force checks of the vectorised sweeps."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.eval import verification as V


def _largest(name: str, got, want) -> float:
    err = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64))))
    print(f"case08 {name}: largest abs error {err:.3e}")
    return err


@pytest.mark.golden
def test_case08_insightface_verification(golden_dir):
    d = np.load(golden_dir / "case08_verification_10fold.npz", allow_pickle=False)
    orig = d["emb_orig_f16"].astype(np.float32)
    flip = d["emb_flip_f16"].astype(np.float32)
    r = V.evaluate_embeddings(orig, d["issame"], flip)
    assert _largest("fused_dist", r.distance, d["fused_dist_f64"]) <= 1e-12
    assert _largest("fold_accuracy", r.fold_accuracy, d["fold_accuracy"]) <= 1e-12
    assert _largest("fold_best_threshold", r.fold_threshold, d["fold_best_threshold"]) <= 1e-12
    assert _largest("tpr", r.tpr, d["tpr"]) <= 1e-12
    assert _largest("fpr", r.fpr, d["fpr"]) <= 1e-12
    assert _largest("val", r.val, d["val"]) <= 1e-9
    assert _largest("val_std", r.val_std, d["val_std"]) <= 1e-9
    assert _largest("far", r.far, d["far"]) <= 1e-9
    assert _largest("acc2", r.accuracy, d["test_acc2"]) <= 1e-12
    assert _largest("std2", r.std, d["test_std2"]) <= 1e-12
    assert r.xnorm == pytest.approx(float(d["test_xnorm"]), rel=1e-9)
    # acc1/std1 of the reference are always 0 (it never evaluates un-fused embeddings)
    assert float(d["test_acc1"]) == 0.0 and float(d["test_std1"]) == 0.0


@pytest.mark.golden
def test_case08_without_flip(golden_dir):
    d = np.load(golden_dir / "case08_verification_10fold.npz", allow_pickle=False)
    r = V.evaluate_embeddings(d["emb_orig_f16"].astype(np.float32), d["issame"])
    assert _largest("noflip_fold_accuracy", r.fold_accuracy, d["noflip_fold_accuracy"]) <= 1e-12
    assert _largest("noflip_tpr", r.tpr, d["noflip_tpr"]) <= 1e-12
    assert _largest("noflip_fpr", r.fpr, d["noflip_fpr"]) <= 1e-12
    assert r.val == pytest.approx(float(d["noflip_val"]), abs=1e-9)
    assert r.val_std == pytest.approx(float(d["noflip_val_std"]), abs=1e-9)
    assert r.far == pytest.approx(float(d["noflip_far"]), abs=1e-9)


# ------------------------------------------------------------------ brute force (the reference's loops)


def _brute_roc(thresholds, dist, issame, n_folds):
    n = dist.shape[0]
    folds = V.kfold_slices(n, n_folds)
    tprs = np.zeros((n_folds, thresholds.shape[0]))
    fprs = np.zeros_like(tprs)
    acc, best_thr = np.zeros(n_folds), np.zeros(n_folds)

    def calc(thr, d, same):
        pred = d < thr
        tp, fp = np.sum(pred & same), np.sum(pred & ~same)
        tn, fn = np.sum(~pred & ~same), np.sum(~pred & same)
        tpr = 0 if tp + fn == 0 else tp / (tp + fn)
        fpr = 0 if fp + tn == 0 else fp / (fp + tn)
        return tpr, fpr, (tp + tn) / d.size

    for f, sl in enumerate(folds):
        test = np.arange(n)[sl]
        train = np.setdiff1d(np.arange(n), test)
        acc_train = np.array([calc(t, dist[train], issame[train])[2] for t in thresholds])
        b = int(np.argmax(acc_train))
        for i, t in enumerate(thresholds):
            tprs[f, i], fprs[f, i], _ = calc(t, dist[test], issame[test])
        acc[f] = calc(thresholds[b], dist[test], issame[test])[2]
        best_thr[f] = thresholds[b]
    return tprs.mean(0), fprs.mean(0), acc, best_thr


@pytest.mark.parametrize("n", [600, 617, 53])
def test_grid_sweep_matches_per_threshold_loop(n):
    rng = np.random.default_rng(n)
    issame = rng.random(n) < 0.5
    # quantised distances: many ties with the grid and with each other
    dist = np.round(np.where(issame, rng.normal(1.0, 0.4, n), rng.normal(1.8, 0.4, n)).clip(0, 3.99), 2)
    thr = np.arange(0, 4, 0.01)
    r = V.kfold_accuracy_grid(dist, issame, thr, "<", 10)
    tpr, fpr, acc, best = _brute_roc(thr, dist, issame, 10)
    np.testing.assert_array_equal(r.fold_accuracy, acc)
    np.testing.assert_array_equal(r.fold_threshold, best)
    np.testing.assert_allclose(r.tpr, tpr, atol=1e-15)
    np.testing.assert_allclose(r.fpr, fpr, atol=1e-15)


def test_score_candidates_match_brute_force():
    rng = np.random.default_rng(3)
    n = 407
    issame = rng.random(n) < 0.4
    scores = np.round(np.where(issame, rng.normal(2, 1, n), rng.normal(0, 1, n)), 1)
    r = V.kfold_accuracy_scores(scores, issame, higher_is_same=True, n_folds=10)
    for f, sl in enumerate(V.kfold_slices(n, 10)):
        train = np.setdiff1d(np.arange(n), np.arange(n)[sl])
        cands = list(np.unique(scores[train])) + [np.inf]
        accs = [np.mean((scores[train] >= c) == issame[train]) for c in cands]
        thr = cands[int(np.argmax(accs))]
        assert r.fold_threshold[f] == thr
        assert r.fold_accuracy[f] == np.mean((scores[sl] >= thr) == issame[sl])
    # a distance (lower = same) gives the mirrored result
    r2 = V.kfold_accuracy_scores(-scores, issame, higher_is_same=False, n_folds=10)
    np.testing.assert_array_equal(r2.fold_accuracy, r.fold_accuracy)


def test_val_at_far_matches_bracket_rule():
    rng = np.random.default_rng(5)
    n = 3000
    issame = rng.random(n) < 0.5
    dist = np.where(issame, rng.normal(1.0, 0.3, n), rng.normal(1.9, 0.3, n)).clip(0, 3.99)
    thresholds = np.arange(0, 4, 0.001)
    val, val_std, far = V.val_at_far(dist, issame, 1e-2, thresholds)
    vals, fars = [], []
    for sl in V.kfold_slices(n, 10):
        train = np.setdiff1d(np.arange(n), np.arange(n)[sl])
        neg = ~issame[train]
        far_train = np.array([np.sum((dist[train] < t) & neg) / neg.sum() for t in thresholds])
        j = np.max(np.flatnonzero(far_train <= 1e-2))
        t = thresholds[j] + (1e-2 - far_train[j]) * (thresholds[j + 1] - thresholds[j]) / (
            far_train[j + 1] - far_train[j]
        )
        pred = dist[sl] < t
        vals.append(np.sum(pred & issame[sl]) / issame[sl].sum())
        fars.append(np.sum(pred & ~issame[sl]) / (~issame[sl]).sum())
    assert val == pytest.approx(np.mean(vals), abs=1e-12)
    assert val_std == pytest.approx(np.std(vals), abs=1e-12)
    assert far == pytest.approx(np.mean(fars), abs=1e-12)


def test_kfold_slices_match_sklearn():
    from sklearn.model_selection import KFold

    for n in (10, 6000, 6007, 1003):
        ours = [np.arange(n)[s] for s in V.kfold_slices(n, 10)]
        theirs = [test for _, test in KFold(10, shuffle=False).split(np.arange(n))]
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("drop", [True, False])
def test_roc_curve_matches_sklearn(drop):
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(11)
    y = rng.random(5000) < 0.1
    s = np.round(rng.normal(size=5000) + 2 * y, 2)  # ties
    fpr, tpr, thr = V.roc_curve(y, s, drop_intermediate=drop)
    f2, t2, th2 = roc_curve(y, s, drop_intermediate=drop)
    np.testing.assert_array_equal(fpr, f2)
    np.testing.assert_array_equal(tpr, t2)
    np.testing.assert_array_equal(thr, th2)


def test_tar_nearest_matches_reference_selection():
    rng = np.random.default_rng(2)
    y = rng.random(20000) < 0.05
    s = rng.normal(size=20000) + 3 * y
    fpr, tpr, _ = V.roc_curve(y, s)
    got = V.tar_at_far_nearest(fpr, tpr)
    fr, tr = np.flipud(fpr), np.flipud(tpr)
    for level, g in zip(V.FAR_LEVELS, got, strict=True):
        _, idx = min(zip(abs(fr - level), range(len(fr)), strict=True))
        assert g == tr[idx]


def test_tar_interp_on_known_curve():
    fpr = np.array([0.0, 0.0, 0.1, 0.1, 1.0])
    tpr = np.array([0.0, 0.5, 0.6, 0.8, 1.0])
    got = V.tar_at_far_interp(fpr, tpr, np.array([0.0, 0.05, 0.1, 0.55]))
    np.testing.assert_allclose(got, [0.5, 0.65, 0.8, 0.9])


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="must be equal"):
        V.kfold_accuracy_grid(np.zeros(20), np.zeros(19, bool), V.INSIGHTFACE_THRESHOLDS)
    with pytest.raises(ValueError, match="NaN"):
        V.kfold_accuracy_scores(np.r_[np.zeros(19), np.nan], np.zeros(20, bool))
    with pytest.raises(ValueError, match="folds"):
        V.kfold_slices(5, 10)
    with pytest.raises(ValueError, match="embedding rows"):
        V.evaluate_embeddings(np.zeros((10, 4)), np.zeros(6, bool))
