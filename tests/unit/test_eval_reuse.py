"""Evaluation without redoing work: the embedding cache of a backbone's outputs (shared by every model on
that backbone), and one `facepipe evaluate --model` for the pair tables and the protocol sets together."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facepipe.cli import main
from facepipe.eval.embed_cache import EmbeddingCache
from facepipe.eval.features import read_provenance
from facepipe.eval.model_features import embed_table_images, load_eval_model, pair_table_features
from tests.unit.test_compare import degraded_shards
from tests.unit.test_evaluate_model import _bundle

N_PAIRS = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A decoded dataset with one pair table (degradation columns included) and the generated IJB and
    video protocol folders."""
    root = tmp_path_factory.mktemp("reuse")
    shards = degraded_shards(root / "shards", N_PAIRS)
    synth = ["synth", str(root / "raw"), "--protocols", "ijb,video", "--protocols-only"]
    assert main([*synth, "--protocol-subjects", "4", "--size", "64"]) == 0
    models = {m: _bundle(root / m, m) for m in ("probface", "pfe")}  # seed 0: one backbone
    models["other"] = _bundle(root / "other", "probface", seed=1)  # another backbone
    return shards / "pairs" / "synth_val.parquet", root / "raw" / "protocols", models


def _same(a, b) -> None:
    for key in ("embeddings", "flipped", "uncertainty", "degradation", "issame", "fold"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


def _never():
    """Image batches that must not be needed: the backbone's outputs are in the cache."""
    raise AssertionError("the backbone ran although its outputs were cached")
    yield


def test_cache_gives_the_same_features_and_runs_each_backbone_once(data, tmp_path, caplog):
    table, _, models = data
    cache = EmbeddingCache(tmp_path / "cache")
    probface, pfe = load_eval_model(models["probface"]), load_eval_model(models["pfe"])
    assert probface.backbone_digest == pfe.backbone_digest and probface.fingerprint != pfe.fingerprint

    first = pair_table_features(probface, table, batch_images=14, show_progress=False, cache=cache)
    _same(first, pair_table_features(probface, table, batch_images=14, show_progress=False))
    assert len(list(cache.root.glob("*.npz"))) == 1
    # another head on the same backbone reads the backbone's outputs and only runs its own head
    plain = pair_table_features(pfe, table, batch_images=14, show_progress=False)
    cached = embed_table_images(pfe, _never(), table, "RGB", True, 14, cache)
    for key in ("embeddings", "flipped", "uncertainty"):
        np.testing.assert_array_equal(cached[key], getattr(plain, key), err_msg=key)
    assert plain.uncertainty.shape == (2 * N_PAIRS, 32)  # PFE: σ² per dimension, not ProbFace's scalar

    # another backbone, or other settings, never hit that entry
    other = load_eval_model(models["other"])
    _same(
        pair_table_features(other, table, batch_images=14, show_progress=False, cache=cache),
        pair_table_features(other, table, batch_images=14, show_progress=False),
    )
    pair_table_features(probface, table, batch_images=14, flip=False, show_progress=False, cache=cache)
    assert len(list(cache.root.glob("*.npz"))) == 3

    # an unreadable entry is computed again, not trusted
    for entry in cache.root.glob("*.npz"):
        entry.write_bytes(b"truncated")
    again = pair_table_features(probface, table, batch_images=14, show_progress=False, cache=cache)
    _same(again, first)
    assert "unreadable" in caplog.text


def test_one_process_scores_pair_tables_and_protocols(data, tmp_path, capsys):
    table, protocols, models = data
    out, cache = tmp_path / "report", tmp_path / "cache"
    settings = ["eval.folds=2", "eval.batch_size=32"]
    argv = ["evaluate", "--model", str(models["probface"]), "--shards", str(table.parent.parent)]
    argv += ["--protocol", str(protocols / "ijb"), "--protocol", str(protocols / "video")]
    assert main([*argv, "--embedding-cache", str(cache), "--out", str(out), *settings]) == 0
    printed = capsys.readouterr().out
    assert "on 1 pair tables" in printed and f"on {protocols / 'ijb'}" in printed
    assert "synth_val" in json.loads((out / "metrics.json").read_text())
    assert set(json.loads((out / "ijb" / "identification" / "metrics.json").read_text())["galleries"]) == {
        "G1",
        "G2",
    }
    assert len(list(cache.glob("*.npz"))) == 3  # the pair table, the IJB images and the video frames

    # the same reports as the protocols scored one at a time, without a cache, into OUT itself
    for kind, name in (
        ("ijb", "metrics.json"),
        ("ijb", "identification/metrics.json"),
        ("video", "metrics.json"),
    ):
        alone = tmp_path / f"alone-{kind}"
        one = ["evaluate", "--model", str(models["probface"]), "--protocol", str(protocols / kind)]
        assert main([*one, "--out", str(alone), *settings]) == 0
        assert json.loads((alone / name).read_text()) == json.loads((out / kind / name).read_text())

    # the pair table's features are kept, with what made them
    info = json.loads((out / "model.json").read_text())
    made = read_provenance(out / "synth_val" / "features.npz")
    assert made["model"] == info["fingerprint"] and made["flip"] is True and len(made["table"]) == 64
    assert not list(out.rglob(".*.tmp"))  # written atomically: no temporary file left behind


def test_protocol_folders_of_one_name_are_refused(data, tmp_path, capsys):
    table, protocols, models = data
    twin = tmp_path / "copy" / "ijb"
    twin.mkdir(parents=True)
    argv = ["evaluate", "--model", str(models["probface"]), "--shards", str(table.parent.parent)]
    argv += ["--protocol", str(protocols / "ijb"), "--protocol", str(twin), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "distinct names" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_cache_is_a_local_folder_from_the_config(tmp_path):
    """`eval.embedding_cache` names it; an object-storage location is refused, naming it."""
    from facepipe.config import Config
    from facepipe.errors import FacepipeError

    config = Config()
    assert EmbeddingCache.at(config.eval.embedding_cache) is None  # off unless configured
    assert EmbeddingCache.at(str(tmp_path / "cache")).root == tmp_path / "cache"
    with pytest.raises(FacepipeError, match="s3://bucket/cache"):
        EmbeddingCache.at("s3://bucket/cache")
