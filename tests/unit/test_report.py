"""Evaluation report: metrics JSON and PNG plots (ROC, DET, risk, uncertainty by degradation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facepipe.eval import report
from facepipe.eval.features import PairFeatures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_features(n_pairs=600, d=32, per_dim=False, seed=0, with_unc=True) -> PairFeatures:
    """Pairs whose noise grows with a degradation level; uncertainty tracks the degradation."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 200, n_pairs)
    issame = np.tile(np.repeat([True, False], 30), n_pairs // 60)
    other = (ids + 1 + rng.integers(0, 198, n_pairs)) % 200
    centres = rng.normal(size=(200, d))
    deg = rng.uniform(0, 1, 2 * n_pairs)
    emb = np.empty((2 * n_pairs, d))
    emb[0::2] = centres[ids]
    emb[1::2] = centres[np.where(issame, ids, other)]
    emb += rng.normal(size=emb.shape) * (0.3 + 1.5 * deg[:, None])
    flipped = emb + rng.normal(0, 0.05, emb.shape)
    unc = None
    if with_unc:
        # variance of a unit embedding's coordinates: noise² spread over d dims, relative to the centre
        base = (0.3 + 1.5 * deg) ** 2 / (d + (0.3 + 1.5 * deg) ** 2 * d)
        unc = np.repeat(base[:, None], d, 1) * rng.uniform(0.8, 1.2, (2 * n_pairs, d)) if per_dim else base
    return PairFeatures(
        embeddings=emb.astype(np.float32),
        issame=issame,
        flipped=flipped.astype(np.float32),
        uncertainty=unc,
        degradation=deg,
    )


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 10_000


@pytest.mark.parametrize("per_dim", [False, True])
def test_full_report_with_uncertainty(tmp_path, per_dim):
    metrics, paths = report.evaluate_pair_features(synthetic_features(per_dim=per_dim), tmp_path, "synthetic")
    names = sorted(p.name for p in paths)
    assert names == [
        "det.png",
        "edc_fmr_0.0001.png",
        "edc_fmr_0.001.png",
        "metrics.json",
        "risk.png",
        "roc.png",
        "uncertainty_hist.png",
    ]
    for p in paths:
        if p.suffix == ".png":
            assert _is_png(p), p
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["n_pairs"] == 600
    assert 0.5 < on_disk["insightface"]["accuracy"] <= 1.0
    score = "mls_pfe" if per_dim else "mls_probface"
    assert score in on_disk and score in on_disk["risk"]
    risk = on_disk["risk"]["cosine"]
    assert risk["n_kept"] == [600, 540, 480, 420]
    # uncertainty follows degradation here, so rejecting uncertain pairs must help
    assert risk["accuracy"][-1] > risk["accuracy"][0]
    by_deg = on_disk["uncertainty_by_degradation"]
    assert by_deg["clean"]["mean"] < by_deg["mid"]["mean"] < by_deg["degraded"]["mean"]


def test_report_without_uncertainty(tmp_path):
    metrics, paths = report.evaluate_pair_features(synthetic_features(with_unc=False), tmp_path)
    assert sorted(p.name for p in paths) == [
        "det.png",
        "edc_fmr_0.0001.png",
        "edc_fmr_0.001.png",
        "metrics.json",
        "roc.png",
    ]
    assert "risk" not in metrics


def test_histogram_without_degradation_and_linear_range(tmp_path):
    u = np.random.default_rng(1).uniform(1.0, 2.0, 500)
    path = report.plot_uncertainty_hist(u, None, tmp_path / "h.png", "inv_kappa")
    assert _is_png(path)


def test_metrics_json_is_plain(tmp_path):
    path = report.write_metrics(tmp_path, {"a": np.float32(0.5), "b": np.arange(3), "c": float("inf")})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": "inf"}
