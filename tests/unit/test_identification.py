"""1:N identification, open-set gallery and video set-to-set verification, against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.eval import identification as I
from facepipe.eval import openset as O
from facepipe.eval import video as Vd


def _problem(seed=0, n_probe=300, n_gallery=40, d=8, quantise=True):
    rng = np.random.default_rng(seed)
    gallery_ids = rng.permutation(60)[:n_gallery]
    gallery = rng.normal(size=(n_gallery, d))
    probe_ids = rng.integers(0, 60, n_probe)  # ids >= some not enrolled -> non-mated probes
    centres = rng.normal(size=(60, d))
    centres[gallery_ids] = gallery
    probes = centres[probe_ids] + rng.normal(0, 0.9, (n_probe, d))
    if quantise:  # integer-valued scores: lots of ties
        probes, gallery = np.round(probes), np.round(gallery)
    return probes, probe_ids, gallery, gallery_ids


def _brute(probes, probe_ids, gallery, gallery_ids):
    ranks, mate, top = [], [], []
    for p, pid in zip(probes, probe_ids, strict=True):
        s = [float(np.dot(p, g)) for g in gallery]
        top.append(max(s))
        mates = [x for x, gid in zip(s, gallery_ids, strict=True) if gid == pid]
        if mates:
            best = max(mates)
            ranks.append(1 + sum(x > best for x in s))
            mate.append(best)
        else:
            ranks.append(0)
            mate.append(-np.inf)
    return np.array(ranks), np.array(mate), np.array(top)


def test_search_cmc_tpir_match_brute_force():
    probes, pid, gallery, gid = _problem()
    res = I.search(probes, pid, gallery, gid, chunk=17)
    ranks, mate, top = _brute(probes, pid, gallery, gid)
    np.testing.assert_array_equal(res.rank, ranks)
    np.testing.assert_array_equal(res.mate_score, mate)
    np.testing.assert_array_equal(res.top_score, top)
    cmc = I.cmc(res)
    mated = ranks > 0
    for k in (1, 5, 10):
        assert cmc[k] == pytest.approx(np.mean(ranks[mated] <= k))
    assert cmc[1] <= cmc[5] <= cmc[10]
    nm_top = top[~mated]
    for f, row in I.tpir_at_fpir(res, (0.0, 0.05, 0.2, 1.0)).items():
        # brute force: the smallest threshold among candidates whose FPIR (top > t) stays <= f
        cands = sorted(set(nm_top.tolist()) | {-np.inf})
        ok = [t for t in cands if np.mean(nm_top > t) <= f]
        t = min(ok)
        assert row["threshold"] == t
        assert row["fpir"] == pytest.approx(np.mean(nm_top > t))
        assert row["tpir"] == pytest.approx(np.mean((ranks[mated] == 1) & (mate[mated] > t)))


def test_identification_errors():
    probes, pid, gallery, gid = _problem(1)
    res = I.search(probes, pid, gallery, gid)
    res.mated[:] = True
    with pytest.raises(ValueError, match="not in the gallery"):
        I.tpir_at_fpir(res)
    with pytest.raises(ValueError, match="differ"):
        I.search(probes, pid[:-1], gallery, gid)


def test_openset_sweep_matches_brute_force():
    probes, pid, gallery, gid = _problem(2, quantise=False)
    dec = O.decide_inputs(probes, pid, gallery, gid, chunk=50)
    thresholds = np.quantile(dec.best_score, [0.0, 0.1, 0.5, 0.9, 1.0])
    sw = O.sweep(dec, thresholds)
    known = np.isin(pid, gid)
    for i, t in enumerate(thresholds):
        pred = O.predict(dec, t)
        accepted = pred != O.UNKNOWN
        assert sw["false_accept"][i] == pytest.approx(np.mean(accepted[~known]))
        assert sw["false_reject"][i] == pytest.approx(np.mean(~accepted[known]))
        assert sw["misidentify"][i] == pytest.approx(np.mean(accepted[known] & (pred[known] != pid[known])))
        assert sw["correct"][i] == pytest.approx(np.mean(pred[known] == pid[known]))
    one = O.rates(dec, float(thresholds[2]))
    assert one["false_reject"] == pytest.approx(sw["false_reject"][2])


def test_threshold_at_false_accept_meets_target():
    probes, pid, gallery, gid = _problem(3, quantise=False)
    dec = O.decide_inputs(probes, pid, gallery, gid)
    for target in (0.0, 0.1, 0.5):
        t = O.threshold_at_false_accept(dec, target)
        fa = O.rates(dec, t)["false_accept"]
        assert fa <= target
        # one step lower would exceed it (the threshold is the lowest that meets the target)
        unknown = np.sort(dec.best_score[~dec.known])
        below = unknown[unknown < t]
        if below.size:
            assert O.rates(dec, float(below[-1]))["false_accept"] > target


def test_video_set_to_set_verification():
    rng = np.random.default_rng(5)
    n_videos, d = 200, 16
    person = rng.integers(0, 60, n_videos)
    centres = rng.normal(size=(60, d))
    frames, video_of = [], []
    for v in range(n_videos):
        k = rng.integers(3, 9)
        frames.append(centres[person[v]] + rng.normal(0, 1.0, (k, d)))
        video_of += [v * 3 + 1] * k  # sparse video ids
    frames = np.concatenate(frames)
    video_of = np.array(video_of)
    va, vb = rng.integers(0, n_videos, 500), rng.integers(0, n_videos, 500)
    same = person[va] == person[vb]
    res = Vd.verify_videos(frames, video_of, va * 3 + 1, vb * 3 + 1, same)

    # brute force: mean of unit frames per video, renormalised, cosine
    def tmpl(v):
        f = frames[video_of == v * 3 + 1]
        m = (f / np.linalg.norm(f, axis=1, keepdims=True)).mean(0)
        return m / np.linalg.norm(m)

    want = np.array([tmpl(a) @ tmpl(b) for a, b in zip(va, vb, strict=True)])
    np.testing.assert_allclose(res.roc.scores, want, atol=1e-12)
    assert res.kfold.accuracy > 0.8
    assert 0.0 <= res.metrics()["tar_at_far_nearest"]["1e-01"] <= 1.0
