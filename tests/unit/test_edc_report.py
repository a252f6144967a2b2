"""The `edc` section of `facepipe evaluate`: methods and baselines, config targets, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facepipe.cli import main
from facepipe.eval.edc_report import EdcSettings, image_qualities, unsupported_reason, write_edc
from facepipe.eval.features import save_features
from tests.unit.test_evaluate_cli import _pair_table
from tests.unit.test_report import _is_png, synthetic_features


def test_uncertainty_that_ranks_like_degradation_has_its_curve(tmp_path):
    """σ² here is a monotone function of the degradation, so both rank pairs alike: identical EDCs."""
    f = synthetic_features()
    q = image_qualities(f)
    assert set(q) == {"probface", "feature_norm", "random", "true_degradation"}
    np.testing.assert_allclose(q["probface"], -np.asarray(f.uncertainty))  # quality = −σ²
    np.testing.assert_allclose(q["feature_norm"], np.linalg.norm(f.embeddings.astype(np.float64), axis=1))
    fused = f.embeddings + f.flipped
    fused /= np.linalg.norm(fused, axis=1, keepdims=True)
    cos = np.einsum("ij,ij->i", fused[0::2], fused[1::2])
    settings = EdcSettings((1e-2, 1e-1), 0.3, 0.6)
    section, paths = write_edc(cos, f.issame, f, tmp_path, "synthetic", settings)
    methods = section["methods"]
    for key in ("fmr=0.01", "fmr=0.1"):
        assert methods["probface"][key]["fnmr"] == methods["true_degradation"][key]["fnmr"]
        assert methods["probface"][key]["pauc"] == methods["true_degradation"][key]["pauc"]
        # the degradation drives the errors here: it beats random discard, the ideal beats everything
        assert methods["true_degradation"][key]["pauc"] < methods["random_expected"][key]["pauc"]
        assert methods["ideal"][key]["pauc"] <= min(m[key]["pauc"] for m in methods.values())
        assert methods["random"][key]["discard_fractions"][-1] == pytest.approx(0.6)
    assert [p.name for p in paths] == ["edc_fmr_0.01.png", "edc_fmr_0.1.png"]
    assert all(_is_png(p) for p in paths)


def test_cli_takes_targets_and_population_from_config(tmp_path):
    f = synthetic_features(with_unc=False)
    feats = tmp_path / "f.npz"
    save_features(feats, embeddings=f.embeddings, flipped=f.flipped, degradation=f.degradation)
    pairs = tmp_path / "lfw.parquet"
    _pair_table(pairs, f.issame)
    out = tmp_path / "out"
    argv = ["evaluate", "--features", str(feats), "--pairs", str(pairs), "--out", str(out)]
    overrides = ["eval.edc_fmr_targets=[0.05]", "eval.edc_discard_limit=0.1", "eval.edc_population=mated"]
    assert main([*argv, *overrides]) == 0
    edc = json.loads((out / "metrics.json").read_text())["edc"]
    assert edc["fmr_targets"] == [0.05] and edc["population"] == "mated" and edc["discard_limit"] == 0.1
    # no uncertainty in the file: the baselines and the reference lines only
    assert set(edc["methods"]) == {"feature_norm", "random", "true_degradation", "ideal", "random_expected"}
    curve = edc["methods"]["true_degradation"]["fmr=0.05"]
    assert len(curve["discard_fractions"]) == len(curve["fnmr"]) == len(curve["fmr"]) == 101
    assert curve["fmr"][0] <= 0.05 and 0.0 <= curve["pauc"] <= 0.1
    assert (out / "edc_fmr_0.05.png").is_file()
    assert main([*argv, "eval.edc_population=some"]) == 2  # a typed field: a typo is an error


def test_fmr_target_needs_one_over_fmr_impostor_comparisons(tmp_path):
    """Below 1/FMR impostor comparisons the threshold sits at the top impostor score for any such FMR:
    the target is marked unsupported (no curve, pAUC null, the PNG says so) instead of plotted."""
    from facepipe.eval.edc import threshold_at_fmr

    assert unsupported_reason(1000, 1e-3) is None and unsupported_reason(100, 0.01) is None
    assert "999 impostor comparisons < 1/FMR = 1000" in unsupported_reason(999, 1e-3)
    f = synthetic_features()  # 300 impostor pairs: 0.01 is supported, 1e-3 and 1e-4 are not
    fused = f.embeddings + f.flipped
    fused /= np.linalg.norm(fused, axis=1, keepdims=True)
    cos = np.einsum("ij,ij->i", fused[0::2], fused[1::2])
    top_impostor = cos[~f.issame].max()
    assert threshold_at_fmr(cos, f.issame, 1e-3) == threshold_at_fmr(cos, f.issame, 1e-4) == top_impostor
    section, paths = write_edc(cos, f.issame, f, tmp_path, "small", EdcSettings((0.01, 1e-3, 1e-4)))
    alone, _ = write_edc(cos, f.issame, f, tmp_path / "alone", "small", EdcSettings((0.01,)))
    assert section["n_impostor"] == 300
    assert sorted(section["unsupported"]) == ["fmr=0.0001", "fmr=0.001"]
    assert "300 impostor comparisons < 1/FMR = 10000" in section["unsupported"]["fmr=0.0001"]
    for name, per in section["methods"].items():
        assert per["fmr=0.001"] == {"fmr_target": 0.001, "supported": False, "pauc": None}
        # the supported target is computed exactly as on its own
        assert per["fmr=0.01"] == alone["methods"][name]["fmr=0.01"] and per["fmr=0.01"]["supported"]
        assert per["fmr=0.01"]["pauc"] is not None
    assert [p.name for p in paths] == ["edc_fmr_0.01.png", "edc_fmr_0.001.png", "edc_fmr_0.0001.png"]
    assert all(_is_png(p) for p in paths)
    json.dumps(section, allow_nan=False)  # null, not NaN, in metrics.json
