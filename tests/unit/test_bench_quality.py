"""bench/quality.py's EDC part: every head's pAUC beside random discard and the oracles, per pair table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.quality import _edc, _towards_ideal, _verdict
from facepipe.config import load_config
from facepipe.data.shards import write_manifest, write_pair_table
from tests.unit.test_evaluate_model import _bundle, _png

N_PAIRS = 120  # 60 impostor pairs: FMR 0.05 is supported, 0.001 is not


def test_towards_ideal_places_a_method_between_random_and_ideal():
    pauc = {"random_expected": 0.04, "ideal": 0.0, "a": 0.01, "b": 0.05}
    assert _towards_ideal(pauc, "a") == pytest.approx(0.75)
    assert _towards_ideal(pauc, "b") == pytest.approx(-0.25)  # worse than random discard
    assert _towards_ideal({**pauc, "ideal": 0.04}, "a") is None  # no room to improve: undefined


def test_edc_reports_each_head_against_random_and_oracles(tmp_path):
    rng = np.random.default_rng(1)
    shards = tmp_path / "shards"
    (shards / "pairs").mkdir(parents=True)
    deg = rng.uniform(0, 1, size=(N_PAIRS, 2))
    issame = (np.arange(N_PAIRS) % 2 == 0).tolist()
    extra = {"degradation_a": deg[:, 0], "degradation_b": deg[:, 1]}
    images = [_png(rng, d) for d in deg.reshape(-1)]
    write_pair_table(shards / "pairs" / "synth_val.parquet", images, issame, extra=extra)
    write_manifest(shards, {"color_order": "RGB", "num_classes": 5})
    heads = {m: {"head_dir": str(_bundle(tmp_path / m, m) / "head")} for m in ("dul", "probface")}
    overrides = [
        f"paths.shards={shards}",
        "eval.folds=5",
        "eval.batch_size=64",
        "eval.edc_fmr_targets=[0.05, 0.001]",
    ]
    config = load_config(None, overrides)
    report = _edc(config, str(tmp_path / "dul"), heads, tmp_path / "edc")
    entry = report["synth_val"]
    assert entry["n_pairs"] == N_PAIRS and list(entry["unsupported"]) == ["fmr=0.001"]
    assert list(entry["pauc"]) == ["fmr=0.05"]  # no number at the unsupported target
    pauc = entry["pauc"]["fmr=0.05"]
    expected = {"dul", "probface", "feature_norm", "random", "true_degradation", "ideal", "random_expected"}
    assert set(pauc) == expected
    assert all(pauc["ideal"] <= v + 1e-12 for v in pauc.values())
    compared = json.loads((tmp_path / "edc" / "models" / "dul" / "synth_val" / "metrics.json").read_text())
    assert compared["edc"]["methods"]["dul"]["fmr=0.05"]["pauc"] == pytest.approx(pauc["dul"], abs=1e-6)
    towards = entry["towards_ideal"]["fmr=0.05"]
    assert set(towards) == {"dul", "probface"}
    assert towards["dul"] == _towards_ideal(pauc, "dul")
    backbone = {"synth_val": {"all": 0.9, "clean": None, "heavily_degraded": None}}
    verdict = _verdict({"backbone": backbone, "edc": report}, "synth_val")
    assert verdict["dul_edc_fmr=0.05_beats_random"] == (towards["dul"] is not None and towards["dul"] > 0)
