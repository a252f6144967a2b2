"""`facepipe evaluate --model`: a model bundle (± uncertainty head) scored on a dataset's pair tables."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from facepipe.cli import main
from facepipe.data.shards import write_manifest, write_pair_table
from facepipe.eval.features import PairFeatures
from facepipe.eval.model_features import load_eval_model, pair_table_features
from facepipe.eval.pairs import degradation_metrics

SIZE = (32, 32)
EMB = 32  # SCF's vMF normaliser needs an embedding of at least 22 dimensions
N_PAIRS = 60


def _bundle(root, method=None, seed=0):
    """A tiny untrained backbone bundle (and head) written the way the training stages write them."""
    from facepipe.models.bundle import BundleInfo, save_bundle
    from facepipe.models.embed import embed_images
    from facepipe.models.registry import build_backbone
    from facepipe.uncertainty.head_io import build_head_model, save_head

    torch.manual_seed(seed)
    kwargs = {"embedding_size": EMB, "input_size": list(SIZE)}
    backbone = build_backbone("iresnet_tiny", **kwargs).eval()
    info = BundleInfo("iresnet_tiny", kwargs, EMB, SIZE, "RGB", num_classes=5, margin="cosface")
    save_bundle(root / "bundle", backbone, info)
    if method is not None:
        emb, _, fmap = embed_images(backbone, np.zeros((1, *SIZE, 3), np.uint8), maps=True)
        meta = {"method": method, "map_shape": list(fmap.shape[1:]), "embedding_size": EMB, "extra": {}}
        head = build_head_model(method, tuple(fmap.shape[1:]), EMB, {})
        save_head(root / "head", head, meta)
    return root


def _png(rng, level):
    base = rng.integers(0, 256, size=(*SIZE, 3)).astype(np.float32)
    img = np.clip(base * (1 - level) + 127 * level, 0, 255).astype(np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A decoded-dataset folder: manifest + two pair tables, one with degradation columns."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    (root / "pairs").mkdir()
    deg = rng.uniform(0, 1, size=(N_PAIRS, 2))
    issame = (np.arange(N_PAIRS) % 2 == 0).tolist()
    images = [_png(rng, d) for d in deg.reshape(-1)]
    extra = {"degradation_a": deg[:, 0], "degradation_b": deg[:, 1]}
    write_pair_table(root / "pairs" / "synth_val.parquet", images, issame, extra=extra)
    write_pair_table(root / "pairs" / "plain.parquet", images[:40], issame[:20])
    write_manifest(root, {"color_order": "RGB", "num_classes": 5})
    return root, deg


def test_features_are_the_backbone_on_image_and_mirror(tmp_path, shards):
    root, deg = shards
    model = load_eval_model(str(_bundle(tmp_path, "probface")))
    assert model.method == "probface" and model.kind == "sigma_sq"
    f = pair_table_features(model, root / "pairs" / "synth_val.parquet", batch_images=14, show_progress=False)
    assert f.embeddings.shape == (2 * N_PAIRS, EMB) and f.flipped.shape == f.embeddings.shape
    assert f.uncertainty.shape == (2 * N_PAIRS, 1) and np.all(f.uncertainty > 0)
    np.testing.assert_allclose(f.degradation, deg.reshape(-1), atol=1e-6)
    assert f.fold is not None and f.issame.sum() == N_PAIRS // 2

    # pair 3's second image, decoded and embedded directly (RGB, no resize needed)
    from facepipe.data.loader import normalise
    from facepipe.data.shards import decode_images, read_pair_table

    table = read_pair_table(root / "pairs" / "synth_val.parquet")
    img = decode_images([table.column("image_b")[3].as_py()], "RGB", SIZE)
    x = normalise(img)  # the training stages' input normalisation
    with torch.no_grad():
        direct = model.backbone.forward_features(x)[0].numpy()
        mirror = model.backbone.forward_features(torch.flip(x, dims=[3]))[0].numpy()
        _, fmap = model.backbone.forward_features(x)
        sigma = model.head.uncertainty(None, fmap).numpy()
    np.testing.assert_allclose(f.embeddings[7], direct[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f.flipped[7], mirror[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f.uncertainty[7], sigma[0], rtol=1e-4)


def test_scf_uncertainty_is_inverse_kappa(tmp_path, shards):
    root, _ = shards
    model = load_eval_model(str(_bundle(tmp_path, "scf")))
    assert model.kind == "inv_kappa"
    f = pair_table_features(model, root / "pairs" / "plain.parquet", show_progress=False)
    assert f.degradation is None
    import pyarrow.parquet as pq

    from facepipe.models.embed import decode_images_of, embed_images

    first = pq.read_table(root / "pairs" / "plain.parquet").column("image_a")[0].as_py()
    _, _, fmap = embed_images(model.backbone, decode_images_of([first], SIZE, "RGB", "x", 0), maps=True)
    kappa = model.head.uncertainty(None, torch.from_numpy(fmap)).detach().numpy()
    np.testing.assert_allclose(f.uncertainty[0], 1.0 / kappa[0], rtol=1e-5)


@pytest.mark.parametrize("method", [None, "probface", "pfe", "scf"])
def test_cli_writes_report_per_pair_table(tmp_path, shards, method, capsys):
    root, _ = shards
    bundle = _bundle(tmp_path / "model", method)
    out = tmp_path / "report"
    argv = ["evaluate", "--model", str(bundle), "--shards", str(root), "--out", str(out)]
    assert main([*argv, "eval.folds=5", "eval.batch_size=32"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary) == {"synth_val", "plain"}
    s = summary["synth_val"]
    assert s["n_pairs"] == N_PAIRS and 0.0 <= s["accuracy"] <= 1.0
    assert "clean_accuracy" in s or s["n_clean_pairs"] < 10
    full = json.loads((out / "synth_val" / "metrics.json").read_text())
    assert full["name"] == "synth_val" and len(full["insightface"]["fold_threshold"]) == 5
    pngs = {p.name for p in (out / "plots" / "synth_val").iterdir()}
    assert {"roc.png", "det.png"} <= pngs
    assert not list((out / "plots").rglob("*.json"))  # dvc reads that folder as plots
    info = json.loads((out / "model.json").read_text())
    assert info["method"] == method and info["folds"] == 5
    if method is None:
        assert "risk_cosine_reject_30" not in s and "spearman_uncertainty_degradation" not in s
    else:
        assert {"risk.png", "uncertainty_hist.png"} <= pngs
        assert {"risk_cosine_reject_0", "risk_cosine_reject_30"} <= set(s)
        assert -1.0 <= s["spearman_uncertainty_degradation"] <= 1.0
        assert "spearman_uncertainty_degradation" not in summary["plain"]  # no degradation columns
        score = {"pfe": "mls_pfe", "probface": "mls_probface", "scf": "scf"}[method]
        assert f"{score}_accuracy" in s and f"risk_{score}_reject_10" in s
    assert "facepipe evaluate" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, shards, capsys):
    root, _ = shards
    bundle = _bundle(tmp_path / "m")
    assert main(["evaluate", "--model", str(bundle), "--out", str(tmp_path / "o")]) == 2
    assert "--shards" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(["evaluate", "--model", str(bundle), "--shards", str(empty), "--out", str(tmp_path / "o")]) == 2
    )
    assert "pair tables" in capsys.readouterr().err
    missing = ["evaluate", "--model", str(tmp_path / "nope"), "--shards", str(root), "--out", str(tmp_path)]
    assert main(missing) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_names_the_undecodable_image(tmp_path, shards):
    root, _ = shards
    bad = tmp_path / "bad"
    (bad / "pairs").mkdir(parents=True)
    rng = np.random.default_rng(1)
    images = [_png(rng, 0.0) for _ in range(40)]
    images[13] = b"not an image"
    write_pair_table(bad / "pairs" / "broken.parquet", images, [True, False] * 10)
    from facepipe.errors import DataError
    from facepipe.eval.model_features import evaluate_model

    model = load_eval_model(str(_bundle(tmp_path / "m")))
    with pytest.raises(DataError) as err:
        evaluate_model(model, bad, tmp_path / "o", n_folds=5)
    assert "broken.parquet" in str(err.value) and "13" in str(err.value)


def test_degradation_metrics_clean_accuracy_and_spearman():
    rng = np.random.default_rng(0)
    n = 400
    issame = np.arange(n) % 2 == 0
    deg = rng.uniform(0, 1, size=(n, 2))
    clean = deg.max(axis=1) < 0.3
    centre = rng.normal(size=(n, 8))
    other = rng.normal(size=(n, 8))
    b = np.where(issame[:, None], centre + 0.05 * rng.normal(size=(n, 8)), other)
    b[~clean] = rng.normal(size=((~clean).sum(), 8))  # degraded pairs carry no signal
    emb = np.stack([centre, b], axis=1).reshape(2 * n, 8)
    u = deg.reshape(-1) + 0.01 * rng.normal(size=2 * n)
    f = PairFeatures(emb, issame, uncertainty=np.abs(u)[:, None] + 1e-3, degradation=deg.reshape(-1))
    m = degradation_metrics(f, n_folds=5)
    assert m["n_clean_pairs"] == int(clean.sum()) and m["n_degraded_pairs"] == n - int(clean.sum())
    assert m["clean_accuracy"] > 0.97
    assert m["degraded_accuracy"] < 0.75
    assert m["spearman_uncertainty_degradation"] > 0.95
    f.degradation = None
    assert degradation_metrics(f) == {}


def test_newest_head_of_a_run_folder_is_used(tmp_path):
    import os

    root = _bundle(tmp_path / "run", "pfe")
    os.utime(root / "head" / "head.json", (1, 1))  # an older checkpoint's head
    newer = _bundle(tmp_path / "other", "scf")
    (root / "checkpoint_2").mkdir()
    (newer / "head").rename(root / "checkpoint_2" / "head")
    model = load_eval_model(str(root))
    assert model.method == "scf"


def test_training_stage_and_evaluate_command_report_the_same_numbers(tmp_path, shards, monkeypatch):
    """The head stage's end-of-stage evaluation, `evaluate --model` and `evaluate --features` on the same
    model and pairs: the same keys and the same values (one evaluation path)."""
    from facepipe.config import load_config
    from facepipe.eval.features import save_features
    from facepipe.eval.metrics import EDC_PAUC, stage_metrics, table_key
    from facepipe.train.head_eval import evaluate_head

    root, _ = shards
    monkeypatch.chdir(tmp_path)  # no params.yaml: the defaults plus these overrides
    overrides = ["eval.folds=5", "eval.batch_size=32", "eval.edc_fmr_targets=[0.1]"]
    bundle = _bundle(tmp_path / "model", "probface")
    model = load_eval_model(str(bundle))

    trained = evaluate_head(
        (model.backbone, model.info),
        model.head,
        "probface",
        root,
        load_config(None, overrides).eval,
        tmp_path / "t",
    )
    out = tmp_path / "cli"
    assert (
        main(["evaluate", "--model", str(bundle), "--shards", str(root), "--out", str(out), *overrides]) == 0
    )
    summary = json.loads((out / "metrics.json").read_text())
    assert trained == pytest.approx(stage_metrics(summary))
    assert set(summary) == {"synth_val", "plain"} and EDC_PAUC in summary["synth_val"]
    for table, headline in summary.items():
        for key, value in headline.items():
            assert trained[table_key(table, key)] == pytest.approx(value)

    # the features file of the same pairs through `evaluate --features`: the same headline
    f = pair_table_features(model, root / "pairs" / "synth_val.parquet", batch_images=32, show_progress=False)
    arrays = {k: getattr(f, k) for k in ("embeddings", "flipped", "uncertainty", "degradation")}
    feats = save_features(tmp_path / "f.npz", **arrays, kind=np.array(f.kind), method=np.array(f.method))
    argv = ["evaluate", "--features", str(feats), "--pairs", str(root / "pairs" / "synth_val.parquet")]
    assert main([*argv, "--folds", "5", "--out", str(tmp_path / "feat"), "eval.edc_fmr_targets=[0.1]"]) == 0
    from_features = json.loads((tmp_path / "feat" / "metrics.json").read_text())["summary"]
    assert from_features == pytest.approx(summary["synth_val"])
