"""Object storage wherever a path goes, against a local S3 endpoint (moto_server) and the two-node Ray
cluster: `facepipe decode SRC s3://…/shards`, `facepipe train backbone --shards s3://…/shards
paths.runs=s3://…/runs` (checkpoints in the bucket, a rerun resumes from them), MLflow artefacts on S3,
and `facepipe evaluate --shards s3://…`. Decode and the resumed training attach through the head's Ray
Client server (`ray://`)."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from facepipe import storage
from facepipe.train.mailbox import read_events
from tests.integration.conftest import small_config
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _objects(location: str) -> list[str]:
    fs, root = storage.resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File)


def _client_address(cluster) -> str:
    """`ray://` address of the head's Ray Client server (its port is on the head's command line)."""
    flag = next(a for a in cluster.procs[0].args if a.startswith("--ray-client-server-port="))
    return f"ray://127.0.0.1:{flag.split('=', 1)[1]}"


def test_decode_train_resume_evaluate_on_s3(ray_cluster, sample_dataset, s3_bucket, tmp_path):  # noqa: F811
    from facepipe.cli import main
    from facepipe.config import dump_config

    shards, runs, client = f"{s3_bucket}/shards", f"{s3_bucket}/runs", _client_address(ray_cluster)
    assert main(["decode", str(sample_dataset / "raw"), shards, "--address", client]) == 0
    objects = _objects(shards)
    assert "manifest.json" in objects and any(o.startswith("train/part-") for o in objects)

    config = small_config(sample_dataset, tmp_path, None)
    config.paths.shards = str(tmp_path / "not-there")  # only the bucket has the data
    config.tracking.artifact_location = f"{s3_bucket}/mlflow"
    params = tmp_path / "params.yaml"
    params.write_text(dump_config(config))
    events_path = tmp_path / "events.jsonl"

    def train(max_steps: int, address: str) -> None:
        argv = ["train", "backbone", "--config", str(params), "--shards", shards, "--name", "on-s3"]
        argv += ["--address", address, "--events", str(events_path)]
        argv += [f"paths.runs={runs}", f"train_backbone.max_steps={max_steps}"]
        assert main(argv) == 0

    train(6, ray_cluster.address)
    run_objects = _objects(f"{runs}/on-s3")
    checkpoints = sorted({o.split("/")[0] for o in run_objects if o.startswith("checkpoint_") and "/" in o})
    assert checkpoints, run_objects
    for name in checkpoints:  # complete checkpoints only: state and metadata of every one
        assert {f"{name}/state.pt", f"{name}/meta.json"} <= set(run_objects)
    last = max(json.loads(storage.read_text(f"{runs}/on-s3/{c}/meta.json"))["step"] for c in checkpoints)
    assert last == 6
    steps = [e["step"] for e in read_events(events_path) if e["event"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert any(o.endswith("plots/train_loss.png") for o in _objects(f"{s3_bucket}/mlflow")), "no artefacts"

    # the same run name resumes from the bucket's last checkpoint: no step lost or repeated
    train(9, client)
    steps = [e["step"] for e in read_events(events_path) if e["event"] == "step"]
    assert steps == list(range(1, 10))

    out = tmp_path / "eval"
    argv = ["evaluate", "--model", "models:/facepipe-backbone@champion", "--shards", shards]
    assert main([*argv, "--out", str(out), "--config", str(params)]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    pairs = json.loads(storage.read_text(f"{shards}/manifest.json"))["pairs"]
    assert set(summary) == set(pairs)  # every pair table of the bucket's dataset was scored
    for name, table in summary.items():
        assert table["n_pairs"] == pairs[name]["pairs"] and 0.0 <= table["accuracy"] <= 1.0
