"""IJB-style templates: InsightFace parity (case 09), chunked/blocked scoring vs direct, fusion callbacks."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.eval import ijb, scoring


@pytest.mark.golden
def test_case09_ijb_1to1(golden_dir):
    d = np.load(golden_dir / "case09_ijb_1to1.npz", allow_pickle=False)
    feats = d["img_feats"]
    half = feats.shape[1] // 2
    tf, uniq = ijb.aggregate_insightface(
        feats[:, :half], d["templates"], d["medias"], feats[:, half:], d["faceness_scores"]
    )
    np.testing.assert_array_equal(uniq, d["unique_templates"])
    err_t = float(np.max(np.abs(tf - d["template_norm_feats"])))
    res = ijb.verify_templates(tf, uniq, d["p1"], d["p2"], d["label"], far_levels=d["far_levels"])
    err_s = float(np.max(np.abs(res.scores - d["score"])))
    printed = np.array([float(f"{t * 100:.2f}") for t in res.tar_nearest])
    err_tar_pairs = float(np.max(np.abs(res.tar_nearest - d["tar_at_far_full"]))) * d["label"].sum()
    print(
        f"case09: template feats {err_t:.2e}, scores {err_s:.2e}, TAR genuine-pair diff {err_tar_pairs:.2f}"
    )
    assert err_t <= 1e-6 and err_s <= 1e-6
    np.testing.assert_array_equal(printed, d["tar_at_far_printed_percent"])
    np.testing.assert_allclose(res.tar_nearest, d["tar_at_far_full"], atol=1e-12)
    np.testing.assert_array_equal(res.fpr, d["roc_fpr"])
    np.testing.assert_array_equal(res.tpr, d["roc_tpr"])
    assert res.auc == pytest.approx(float(d["auc"]), abs=1e-9)
    # float32 template scoring (the fast path at IJB-C scale) is allowed ±1 genuine pair
    res32 = ijb.verify_templates(tf.astype(np.float32), uniq, d["p1"], d["p2"], d["label"])
    assert np.max(np.abs(res32.tar_nearest - d["tar_at_far_full"])) * d["label"].sum() <= 1.0 + 1e-9


def _insightface_loop(img, templates, medias):
    """image2template_feature restated as its loop, for a brute-force comparison."""
    out, uniq = [], np.unique(templates)
    for t in uniq:
        sel = templates == t
        f, m = img[sel], medias[sel]
        out.append(sum(f[m == u].mean(axis=0) for u in np.unique(m)))
    out = np.array(out, dtype=np.float64)
    return out / np.linalg.norm(out, axis=1, keepdims=True), uniq


def test_aggregation_matches_loop_across_chunks():
    rng = np.random.default_rng(0)
    n, d = 900, 16
    templates = rng.choice([3, 7, 50, 51, 1000, 4], n)
    medias = rng.integers(-2, 6, n)  # negative media ids too
    emb, flip = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
    score = rng.uniform(0.5, 1, n).astype(np.float32)
    got, uniq = ijb.aggregate_insightface(emb, templates, medias, flip, score, chunk=128)
    want, uniq2 = _insightface_loop((emb + flip) * score[:, None], templates, medias)
    np.testing.assert_array_equal(uniq, uniq2)
    np.testing.assert_allclose(got, want, atol=1e-6)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("band_bytes,dense", [(1 << 30, 0.0), (4096, 0.0), (1 << 30, 1.1), (8192, 0.02)])
def test_blocked_cosine_matches_direct(band_bytes, dense):
    rng = np.random.default_rng(1)
    feats = _unit(rng.normal(size=(300, 24))).astype(np.float32)
    ia, ib = rng.integers(0, 60, 5000), rng.integers(40, 300, 5000)
    got = scoring.score_pairs_blocked(feats, ia, ib, band_bytes=band_bytes, dense_fraction=dense, chunk=333)
    want = np.sum(feats[ia].astype(np.float64) * feats[ib], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_named_metrics_match_formulas():
    rng = np.random.default_rng(2)
    mu = _unit(rng.normal(size=(50, 8)))
    var = np.exp(rng.uniform(-3, 0, (50, 8)))
    ia, ib = rng.integers(0, 50, 400), rng.integers(0, 50, 400)
    a, b = mu[ia], mu[ib]
    s = var[ia] + var[ib]
    mls = -np.sum((a - b) ** 2 / s + np.log(s), axis=1)
    np.testing.assert_allclose(scoring.score_pairs(mu, ia, ib, "mls", var, chunk=37), mls, rtol=1e-12)
    v1 = var[:, 0]
    s1 = v1[ia] + v1[ib]
    prob = -(2 * (1 - np.sum(a * b, 1)) / (1e-10 + s1) + np.log(s1))
    np.testing.assert_allclose(scoring.score_pairs(mu, ia, ib, "mls_scalar", v1), prob, rtol=1e-10)
    np.testing.assert_allclose(scoring.score_pairs(mu, ia, ib, "cosine"), np.sum(a * b, 1), atol=1e-12)
    with pytest.raises(ValueError, match="unknown metric"):
        scoring.score_pairs(mu, ia, ib, "euclid")
    with pytest.raises(ValueError, match="out of range"):
        scoring.score_pairs(mu, ia, ib + 50, "cosine")


def test_fusion_callback_and_pair_score_callable():
    rng = np.random.default_rng(3)
    n, d = 200, 6
    mu = rng.normal(size=(n, d))
    var = np.exp(rng.uniform(-2, 1, (n, d)))
    templates = rng.integers(0, 25, n) * 10

    def pfe_paper(m, v):
        prec = 1.0 / v
        v_t = 1.0 / prec.sum(0)
        return v_t * (m * prec).sum(0), v_t

    mu_t, var_t, uniq = ijb.aggregate_with(mu, var, templates, pfe_paper)
    for row, t in enumerate(uniq):
        m, v = pfe_paper(mu[templates == t], var[templates == t])
        np.testing.assert_allclose(mu_t[row], m)
        np.testing.assert_allclose(var_t[row], v)
    p1, p2 = rng.choice(uniq, 300), rng.choice(uniq, 300)
    labels = rng.random(300) < 0.3
    res = ijb.verify_templates(mu_t, uniq, p1, p2, labels, scoring.mls_rows, var_t)
    ia, ib = ijb.template_index(uniq, p1), ijb.template_index(uniq, p2)
    np.testing.assert_allclose(res.scores, scoring.mls_rows(mu_t[ia], var_t[ia], mu_t[ib], var_t[ib]))
    with pytest.raises(ValueError, match="template id 3"):
        ijb.template_index(uniq, np.array([0, 3]))


def test_uncertainty_modules_plug_in():
    """The PFE / ProbFace / SCF fusions and pair scores of facepipe.uncertainty, through the adapters."""
    torch = pytest.importorskip("torch")
    pfe = pytest.importorskip("facepipe.uncertainty.pfe")
    probface = pytest.importorskip("facepipe.uncertainty.probface")
    scf = pytest.importorskip("facepipe.uncertainty.scf")
    rng = np.random.default_rng(4)
    n, d = 120, 32  # SCF's Bessel expansion needs d >= 22
    mu = _unit(rng.normal(size=(n, d)))
    templates = rng.integers(0, 12, n)
    for module, unc in (
        (pfe, np.exp(rng.uniform(-3, 0, (n, d)))),
        (probface, np.exp(rng.uniform(-3, 0, (n, 1)))),
        (scf, rng.uniform(10, 500, (n, 1))),
    ):
        fuse = scoring.numpy_callable(module.fuse)
        pair = scoring.numpy_callable(module.pair_score)
        mu_t, u_t, uniq = ijb.aggregate_with(mu, unc, templates, fuse)
        m0, u0 = module.fuse(
            torch.from_numpy(mu[templates == uniq[0]]), torch.from_numpy(unc[templates == uniq[0]])
        )
        np.testing.assert_allclose(mu_t[0], m0.numpy().reshape(-1))
        np.testing.assert_allclose(u_t[0], u0.numpy().reshape(-1))
        ia, ib = rng.integers(0, uniq.shape[0], 50), rng.integers(0, uniq.shape[0], 50)
        got = scoring.score_pairs(mu_t, ia, ib, pair, u_t, chunk=16)
        want = module.pair_score(*(torch.from_numpy(x) for x in (mu_t[ia], u_t[ia], mu_t[ib], u_t[ib])))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10)


def test_locality_order_groups_pairs_and_keeps_input_order_of_results():
    rng = np.random.default_rng(6)
    ia, ib = rng.integers(0, 3000, 20000), rng.integers(0, 5000, 20000)
    order = scoring.locality_order(ia, ib, 3000, 5000, block=256)
    np.testing.assert_array_equal(np.sort(order), np.arange(20000))
    key = (ia[order] // 256) * 10_000 + ib[order] // 256
    assert np.all(np.diff(key) >= 0)
    feats = rng.normal(size=(5000, 8)).astype(np.float32)
    var = rng.uniform(0.1, 1, (5000, 8)).astype(np.float32)
    got = scoring.score_pairs(feats, ia, ib, "mls", var, chunk=64)  # 20000 >= 8*64: reordered
    want = scoring.mls_rows(feats[ia], var[ia], feats[ib], var[ib])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="shaped like the features"):
        scoring.score_pairs(feats, ia, ib, "mls", var[:, :1])
