"""`facepipe evaluate` end to end: features NPZ/Parquet + pair table, templates NPZ, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facepipe.cli import main
from facepipe.data.shards import pair_folds
from facepipe.eval.features import load_pair_features, save_features
from tests.unit.test_report import synthetic_features


def _pair_table(path, issame):
    n = len(issame)
    pq.write_table(
        pa.table(
            {
                "image_a": pa.array([b"a"] * n, pa.binary()),
                "image_b": pa.array([b"b"] * n, pa.binary()),
                "issame": pa.array(issame, pa.bool_()),
                "fold": pa.array(pair_folds(n), pa.int32()),
            }
        ),
        path,
    )


@pytest.fixture()
def inputs(tmp_path):
    f = synthetic_features()
    feats = tmp_path / "feats.npz"
    save_features(
        feats,
        embeddings=f.embeddings,
        flipped=f.flipped,
        uncertainty=f.uncertainty,
        degradation=f.degradation,
    )
    pairs = tmp_path / "lfw.parquet"
    _pair_table(pairs, f.issame)
    return feats, pairs, f


def test_evaluate_features_with_pair_table(inputs, tmp_path, capsys):
    feats, pairs, f = inputs
    out = tmp_path / "out"
    assert main(["evaluate", "--features", str(feats), "--pairs", str(pairs), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["name"] == "lfw" and metrics["n_pairs"] == 600
    assert metrics["fold_column_matches_protocol"] is True
    assert {p.name for p in out.iterdir()} == {
        "metrics.json",
        "roc.png",
        "det.png",
        "risk.png",
        "uncertainty_hist.png",
        "edc_fmr_0.01.png",  # the repo's params.yaml: eval.edc_fmr_targets
        "edc_fmr_0.001.png",
        "edc_fmr_0.0001.png",
    }
    printed = capsys.readouterr().out
    assert "accuracy" in printed and str(out) in printed


def test_evaluate_parquet_features_and_no_uncertainty(tmp_path, inputs):
    _, pairs, f = inputs
    feats = tmp_path / "feats.parquet"
    pq.write_table(
        pa.table(
            {"embedding": pa.array(list(f.embeddings), pa.list_(pa.float32())), "degradation": f.degradation}
        ),
        feats,
    )
    loaded = load_pair_features(feats, pairs)
    np.testing.assert_array_equal(loaded.embeddings, f.embeddings)
    out = tmp_path / "out"
    argv = [
        "evaluate", "--features", str(feats), "--pairs", str(pairs), "--out", str(out), "--uncertainty",
        "none",
    ]  # fmt: skip
    assert main(argv) == 0
    assert not (out / "risk.png").exists()


def _templates_npz(path, d=32, per_dim=False):
    rng = np.random.default_rng(0)
    n = 400
    subject = rng.integers(0, 20, 60)
    templates = rng.integers(0, 60, n)
    centres = rng.normal(size=(20, d))
    emb = centres[subject[templates]] + rng.normal(0, 0.8, (n, d))
    p1, p2 = rng.integers(0, 60, 3000), rng.integers(0, 60, 3000)
    unc = rng.uniform(0.01, 0.5, (n, d) if per_dim else n)
    np.savez(
        path,
        embeddings=emb.astype(np.float32),
        templates=templates,
        medias=rng.integers(0, 5, n),
        faceness=rng.uniform(0.5, 1, n).astype(np.float32),
        uncertainty=unc,
        p1=p1,
        p2=p2,
        label=(subject[p1] == subject[p2]).astype(int),
    )
    return path


@pytest.mark.parametrize("fusion", ["insightface", "pfe", "probface", "scf"])
def test_evaluate_templates(tmp_path, fusion):
    if fusion != "insightface":
        pytest.importorskip(f"facepipe.uncertainty.{fusion}")
    path = _templates_npz(tmp_path / "ijb.npz", per_dim=fusion == "pfe")
    out = tmp_path / "out"
    assert main(["evaluate", "--templates", str(path), "--out", str(out), "--fusion", fusion]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fusion"] == fusion and metrics["n_templates"] == 60
    assert set(metrics["tar_at_far_nearest"]) == {"1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"}
    assert metrics["auc"] > 0.9
    assert (out / "roc.png").is_file()


def test_bad_inputs_name_the_file(tmp_path, inputs, capsys):
    feats, pairs, f = inputs
    out = str(tmp_path / "out")
    assert main(["evaluate", "--features", str(tmp_path / "missing.npz"), "--out", out]) == 2
    assert "missing.npz" in capsys.readouterr().err
    short = tmp_path / "short.parquet"
    _pair_table(short, f.issame[:-1])
    assert main(["evaluate", "--features", str(feats), "--pairs", str(short), "--out", out]) == 2
    assert "need 2 rows per pair" in capsys.readouterr().err
    emb = f.embeddings.copy()
    emb[7, 3] = np.nan
    bad = tmp_path / "nan.npz"
    save_features(bad, embeddings=emb, issame=f.issame)
    assert main(["evaluate", "--features", str(bad), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "nan.npz" in err and "record 7" in err
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip")
    assert main(["evaluate", "--features", str(corrupt), "--out", out]) == 2
    assert "corrupt.npz" in capsys.readouterr().err
    argv = [
        "evaluate", "--features", str(feats), "--pairs", str(pairs), "--out", out, "--rejection", "0,1.5",
    ]  # fmt: skip
    assert main(argv) == 2
    assert not (tmp_path / "out" / "metrics.json").exists()
