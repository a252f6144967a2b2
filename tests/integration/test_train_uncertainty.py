"""Uncertainty heads and fine-tuning on a frozen / registered backbone, through Ray Train and MLflow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facepipe import tracking
from facepipe.train.backbone import train_backbone
from facepipe.train.mailbox import read_events
from tests.integration.conftest import small_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(ray_cluster, sample_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uncertainty")
    config = small_config(sample_dataset, tmp, ray_cluster.address)
    config.train_backbone.scaling.num_workers = 1
    config.train_backbone.max_steps = 8
    config.train_backbone.verify_every_epoch = False
    result = train_backbone(config, run_name="backbone-for-heads")
    assert result.model["champion"]
    return config, tmp


@pytest.mark.parametrize(("method", "cache"), [("probface", True), ("scf", False)])
def test_head_trains_on_champion_and_registers(trained, method, cache):
    config, tmp = trained
    from facepipe.train.head import train_uncertainty

    config.train_uncertainty.cache_features = cache
    config.train_uncertainty.max_steps = 6
    events_path = tmp / f"{method}.jsonl"
    result = train_uncertainty(
        config,
        method=method,
        backbone_uri="models:/facepipe-backbone@champion",
        run_name=f"head-{method}",
        events_path=events_path,
    )
    steps = [e["step"] for e in read_events(events_path) if e["event"] == "step"]
    assert steps == list(range(1, 7))
    assert (result.extra["cache_dir"] is not None) == cache
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    assert "val/synth_val/risk_acc_reject_30" in result.metrics
    assert result.model["name"] == f"facepipe-{method}" and result.model["champion"]
    plots = {a.path for a in tracking.client(config.tracking).list_artifacts(result.run_id, "plots")}
    assert {"plots/train_loss.png", "plots/accuracy_vs_rejection.png"} <= plots

    # the registered head model returns the backbone's embeddings and a positive uncertainty
    model = tracking.load_model(f"models:/facepipe-{method}@champion", config.tracking)
    x = torch.randn(4, 3, 32, 32).numpy()
    out = model.predict(x)
    backbone = tracking.load_model("models:/facepipe-backbone@champion", config.tracking)
    np.testing.assert_allclose(out["embedding"], backbone.predict(x), rtol=1e-5, atol=1e-5)
    width = out["embedding"].shape[1] if method == "pfe" else 1
    assert out["uncertainty"].shape == (4, width) and np.all(out["uncertainty"] > 0)


def test_feature_cache_matches_recomputing_and_is_reused(sample_dataset, tmp_path):
    from facepipe.data.loader import shard_units
    from facepipe.data.sampling import epoch_plan, unit_labels, windows
    from facepipe.data.shards import list_shards
    from facepipe.models.registry import build_backbone
    from facepipe.train.feature_source import CachedFeatures, RecomputedFeatures
    from facepipe.train.features import cache_features, cache_info, cached_shards
    from facepipe.train.head import head_loss
    from facepipe.uncertainty import get_method
    from facepipe.uncertainty.head_io import build_head_model

    torch.manual_seed(0)
    backbone = build_backbone("iresnet_tiny", embedding_size=32, input_size=[32, 32]).eval()
    shards = list_shards(sample_dataset / "shards")
    out = cache_features(backbone, shards, tmp_path / "cache", (32, 32), "RGB", "fp-1")
    first = {p: p.stat().st_mtime_ns for p in cached_shards(out)}
    cache_features(backbone, shards, tmp_path / "cache", (32, 32), "RGB", "fp-1")
    assert {p: p.stat().st_mtime_ns for p in cached_shards(out)} == first  # reused, not rewritten
    map_shape = tuple(cache_info(out)["map_shape"])

    cache_units, image_units = shard_units(cached_shards(out)), shard_units(shards)
    assert [u.rows for u in cache_units] == [u.rows for u in image_units]
    labels = unit_labels(image_units)
    plan = epoch_plan(labels, windows(image_units, 10_000), 0, 0, 0, 1, (4, 4), 0)
    cached = CachedFeatures(cache_units, map_shape).batch(plan[0])
    fresh = RecomputedFeatures(image_units, backbone, (32, 32), "RGB").batch(plan[0])
    np.testing.assert_array_equal(cached[2], fresh[2])
    np.testing.assert_allclose(cached[0], fresh[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cached[1], fresh[1], rtol=1e-2, atol=1e-2)  # maps stored as float16
    head = build_head_model("pfe", map_shape, 32, {})
    head.eval()
    a, _ = head_loss(head, get_method("pfe"), *cached, None)
    b, _ = head_loss(head, get_method("pfe"), *fresh, None)
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-2)

    changed = cache_features(backbone, shards, tmp_path / "cache", (32, 32), "RGB", "fp-2")
    assert cache_info(changed)["fingerprint"] == "fp-2"  # another backbone: rebuilt


def test_finetune_with_triplets_and_centre_term(trained):
    config, tmp = trained
    from facepipe.train.finetune import finetune

    config.finetune.max_steps = 4
    config.finetune.classes_per_batch = 6
    events_path = tmp / "finetune.jsonl"
    result = finetune(
        config,
        backbone_uri="models:/facepipe-backbone@champion",
        run_name="finetune",
        events_path=events_path,
        register=False,
    )
    steps = [e["step"] for e in read_events(events_path) if e["event"] == "step"]
    assert steps == [1, 2, 3, 4]
    assert (result.bundle_dir / "bundle.json").is_file()
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    # the centre term trains (its value is logged each step) and the report compares class compactness
    from facepipe import tracking

    history = tracking.client(config.tracking).get_metric_history(result.run_id, "train/centre")
    assert len(history) == 4 and all(m.value > 0 for m in history)
    for when in ("before", "after"):
        assert 0.0 < result.metrics[f"centre/intra_spread_{when}"] < 2.0
        assert -1.0 <= result.metrics[f"centre/inter_cosine_{when}"] <= 1.0
    plots = {a.path for a in tracking.client(config.tracking).list_artifacts(result.run_id, "plots")}
    assert {"plots/centre_spread.png", "plots/train_loss.png", "plots/roc.png"} <= plots
