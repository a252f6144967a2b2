"""An image folder of real photos → `facepipe align` → the backbone stage trains on the aligned shards.

The aligned shards must be a drop-in for decoded `.rec` shards: same schema, same manifest, and the
Ray Train backbone stage reads them, its loss falls and the model is registered.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from facepipe.train.mailbox import read_events
from tests.integration.conftest import small_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "models/face_detection_yunet_2023mar.onnx"


def test_aligned_photo_folder_trains(faces_dir, ray_cluster, tmp_path):
    from facepipe.cli import main
    from facepipe.config import dump_config

    manifest = json.loads((faces_dir / "manifest.json").read_text())
    photos = tmp_path / "photos"
    for entry in manifest["images"]:
        if entry["identity"]:
            target = photos / entry["identity"] / entry["file"].rsplit("/", 1)[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(faces_dir / entry["file"], target)
    aligned = tmp_path / "aligned"
    argv = ["align", str(photos), str(aligned), "--detector-model", str(faces_dir / MODEL), "--workers", "2"]
    assert main(argv) == 0
    shard_manifest = json.loads((aligned / "manifest.json").read_text())
    assert shard_manifest["num_images"] >= 80 and shard_manifest["num_classes"] >= 25

    config = small_config(aligned.parent, tmp_path, ray_cluster.address)
    config.paths.shards = str(aligned)
    config.train_backbone.backbone.input_size = (56, 56)
    config.train_backbone.batch_size = 16
    config.train_backbone.epochs = 8
    config.train_backbone.scaling.num_workers = 1
    params = tmp_path / "params.yaml"
    params.write_text(dump_config(config))
    events_path = tmp_path / "events.jsonl"
    argv = ["train", "backbone", "--config", str(params), "--name", "aligned", "--events", str(events_path)]
    assert main([*argv, "--address", ray_cluster.address]) == 0

    losses = [e["loss"] for e in read_events(events_path) if e["event"] == "step"]
    assert len(losses) >= 20 and np.all(np.isfinite(losses))
    # a few dozen real faces: the stage must at least fit them
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses

    from facepipe import tracking

    version = tracking.client(config.tracking).get_model_version_by_alias("facepipe-backbone", "champion")
    assert version.run_id
