"""Backbone stage on a real two-node Ray cluster: loss falls, workers on both nodes, model registered."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.train.mailbox import read_events
from tests.integration.conftest import small_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_workers_on_two_nodes_train_and_register(ray_cluster, sample_dataset, tmp_path):
    from facepipe.cli import main
    from facepipe.config import dump_config

    config = small_config(sample_dataset, tmp_path, None)
    params = tmp_path / "params.yaml"
    params.write_text(dump_config(config))
    events_path = tmp_path / "events.jsonl"
    # through the command line; 2 CPUs a worker on nodes of 2 CPUs: Ray must use both nodes
    argv = [
        "train",
        "backbone",
        "--config",
        str(params),
        "--name",
        "two-nodes",
        "--address",
        ray_cluster.address,
        "--events",
        str(events_path),
        "train_backbone.scaling.cpus_per_worker=2",
    ]
    assert main(argv) == 0

    events = read_events(events_path)
    starts = [e for e in events if e["event"] == "start"]
    assert sorted(e["rank"] for e in starts) == [0, 1]
    assert len({e["node"] for e in starts}) == 2, f"workers shared a node: {starts}"

    losses = [e["loss"] for e in events if e["event"] == "step"]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(1, len(steps) + 1))
    assert len(losses) >= 9
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses

    from facepipe import tracking

    mlc = tracking.client(config.tracking)
    version = mlc.get_model_version_by_alias("facepipe-backbone", "champion")
    run_id = version.run_id
    run = mlc.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert 0.0 <= run.data.metrics["accuracy"] <= 1.0
    assert run.data.params["train_backbone.batch_size"] == "32"
    assert "data.manifest_sha256" in run.data.tags
    assert run.data.params["train_backbone.scaling.cpus_per_worker"] == "2.0"
    assert len(mlc.get_metric_history(run_id, "train/loss")) >= 9
    assert mlc.get_metric_history(run_id, "val/synth_val/accuracy")  # verified every epoch
    artifacts = {a.path for a in mlc.list_artifacts(run_id, "plots")}
    assert {"plots/train_loss.png", "plots/roc.png"} <= artifacts
    assert mlc.get_model_version_by_alias("facepipe-backbone", "challenger").version == version.version
    assert version.tags["data.manifest_sha256"] == run.data.tags["data.manifest_sha256"]

    # the registered model gives back the bundle's embeddings
    import torch

    from facepipe.models.bundle import load_bundle

    bundle = tracking.resolve_bundle("models:/facepipe-backbone@champion", config.tracking, tmp_path / "dl")
    backbone, info, centres = load_bundle(bundle)
    assert centres is not None and tuple(centres.shape) == (info.num_classes, info.embedding_size)
    x = torch.randn(4, 3, *info.input_size)
    with torch.no_grad():
        expected = backbone(x).numpy()
    model = tracking.load_model("models:/facepipe-backbone@champion", config.tracking)
    got = model.predict(x.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
