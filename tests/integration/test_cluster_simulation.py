"""A cluster that fails where a real one would: the second Ray node shares no disk with the driver
(see tests/isolated_cluster.py), data and checkpoints on an S3 server, MLflow over HTTP with auth, and
the `pipeline` deployment run through a Prefect server and process worker against all of it.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from facepipe import services, storage
from facepipe.errors import FacepipeError
from tests.integration.conftest import assert_steps_resumed_once, small_config
from tests.isolated_cluster import isolated_cluster, tracking_server  # noqa: F401 - fixtures
from tests.prefect_stack import artifact_markdown, prefect_stack, run_deployment, worker_log
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _spread_config(sample_dataset: Path, tmp_path: Path, address: str, bucket: str, tracking_uri: str):
    config = small_config(sample_dataset, tmp_path, address)
    config.paths.shards = str(tmp_path / "not-there")  # the data is in the bucket only
    config.paths.runs = f"{bucket}/runs"
    config.paths.features = f"{bucket}/features"
    config.tracking.tracking_uri = tracking_uri
    config.tracking.artifact_location = f"{bucket}/mlflow"
    tb = config.train_backbone
    tb.scaling.placement_strategy = "SPREAD"  # one worker on each node
    tb.verify_every_epoch = False
    tb.checkpoint_every_steps = 3
    return config


def test_a_local_path_does_not_reach_the_other_node(
    isolated_cluster,  # noqa: F811
    sample_dataset,
    s3_bucket,  # noqa: F811
    tracking_server,  # noqa: F811
    tmp_path,
):
    """The same run with the driver's local shards path injected fails, naming the path."""
    from facepipe.train.backbone import train_backbone

    config = _spread_config(sample_dataset, tmp_path, isolated_cluster.address, s3_bucket, tracking_server)
    config.train_backbone.max_steps = 3
    config.train_backbone.max_failures = 0
    local = sample_dataset / "shards"  # the driver sees it; the isolated node does not
    with pytest.raises(FacepipeError) as err:
        train_backbone(config, local, run_name="local-path", register=False)
    assert str(local) in str(err.value), str(err.value)


def test_decode_and_align_refuse_a_source_the_other_node_cannot_see(
    isolated_cluster,  # noqa: F811
    sample_dataset,
    s3_bucket,  # noqa: F811
    tmp_path,
):
    """Decode and align over Ray check, before any task, that every node sees their local paths."""
    from facepipe.data.align.job import run_align
    from facepipe.data.decode.job import decode_dataset

    source = sample_dataset / "raw"  # the driver's disk only
    with pytest.raises(FacepipeError) as err:
        decode_dataset([source], f"{s3_bucket}/decoded-local", ray_address=isolated_cluster.address)
    assert str(source) in str(err.value) and "share no disk" in str(err.value), str(err.value)
    assert not storage.exists(f"{s3_bucket}/decoded-local/manifest.json")

    with pytest.raises(FacepipeError) as err:
        run_align(
            sample_dataset / "shards",
            tmp_path / "aligned",
            executor="ray",
            ray_address=isolated_cluster.address,
        )
    assert str(sample_dataset / "shards") in str(err.value) and "share no disk" in str(err.value)
    assert not list((tmp_path / "aligned" / "_work").glob(".facepipe-node-check-*"))


def test_the_isolated_node_really_sees_other_folders(isolated_cluster, sample_dataset, tmp_path):  # noqa: F811
    """A task pinned to the isolated node cannot see the driver's data folder, nor shares its HOME."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from facepipe.cluster import ray_session

    marker = tmp_path / "driver-only.txt"
    marker.write_text("x")
    with ray_session(isolated_cluster.address):
        nodes = [n for n in ray.nodes() if n["Alive"]]
        other = next(n["NodeID"] for n in nodes if "node:__internal_head__" not in n["Resources"])

        @ray.remote(num_cpus=0)
        def look(path: str) -> tuple[bool, str, str]:
            return os.path.exists(path), os.environ.get("HOME", ""), os.getcwd()

        strategy = NodeAffinitySchedulingStrategy(node_id=other, soft=False)
        seen, home, cwd = ray.get(look.options(scheduling_strategy=strategy).remote(str(marker)))
    assert not seen and home != os.environ.get("HOME") and cwd != os.getcwd()


def _objects(location: str) -> list[str]:
    fs, root = storage.resolve(location)
    return [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))]


def _kill_at_first_checkpoint(cluster, runs: str, deadline_s: float, done: threading.Event) -> int | None:
    """SIGKILL the isolated node's raylet once a backbone checkpoint is in the bucket (and has had a
    second to be registered by Ray Train's controller); None if training never got there."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and not done.is_set():
        if any(o.endswith("/state.pt") for o in _objects(f"{runs}/")):
            time.sleep(1.0)
            return cluster.kill_node_raylet()
        time.sleep(0.25)
    return None


def _pipeline_params(workdir: Path, config, bucket: str) -> None:
    config.paths.raw = "data/raw"  # on the flow's disk, versioned by DVC into the bucket
    config.paths.shards = f"{bucket}/shards"
    config.paths.reports = "reports"
    config.decode.workers = 1
    tb = config.train_backbone
    tb.max_steps, tb.epochs = 24, 6  # 5 steps an epoch with two workers on the sample dataset
    data = config.model_dump(mode="json")
    (workdir / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


# last: it kills the isolated node, which the module's other tests need
@pytest.mark.timeout(1800)  # three deployment runs, training included
def test_pipeline_deployment_on_s3_survives_losing_a_node(
    isolated_cluster,  # noqa: F811
    sample_dataset,
    s3_bucket,  # noqa: F811
    tracking_server,  # noqa: F811
    tmp_path,
):
    """`prefect deployment run pipeline/local`: decode → backbone (two workers, one per node) → ProbFace
    → benchmark → registry, all data on S3. The second node dies after the first backbone checkpoint:
    the run resumes from it on what remains, with no step lost or run twice past it. A second run of
    the deployment finds every stage up to date; `train-probface/local` registers a new version."""
    import mlflow

    workdir = tmp_path / "work"
    shutil.copytree(sample_dataset / "raw", workdir / "data" / "raw")
    services.ensure_dvc_repo(workdir, f"{s3_bucket}/dvc", remote_name="store")
    config = _spread_config(sample_dataset, tmp_path, isolated_cluster.address, s3_bucket, tracking_server)
    _pipeline_params(workdir, config, s3_bucket)
    max_steps = config.train_backbone.max_steps
    params = {"workdir": str(workdir), "methods": ["probface"], "synthesize": False, "finetune": False,
              "ray_address": isolated_cluster.address}  # fmt: skip
    # the worker (and so each flow run) inherits this process's S3, MLflow-login and Ray variables
    with prefect_stack(tmp_path / "prefect", ["pipeline/local", "train-probface/local"]) as stack:
        finished, outcome = threading.Event(), {}

        def run() -> None:
            outcome["proc"] = run_deployment(stack["env"], "pipeline/local", params, 900)
            finished.set()

        thread = threading.Thread(target=run)
        thread.start()
        killed = _kill_at_first_checkpoint(isolated_cluster, f"{s3_bucket}/runs", 600, finished)
        thread.join(timeout=960)
        proc = outcome["proc"]
        assert killed is not None, "no backbone checkpoint reached the bucket"
        assert proc.returncode == 0 and "Completed" in proc.stdout, (
            proc.stdout + proc.stderr + worker_log(stack)
        )

        # the backbone stage's console: both nodes at first, then the survivor from the checkpoint
        lines = [ln for ln in (workdir / ".facepipe/logs/train-backbone.log").read_text().splitlines()
                 if "facepipe train: attempt" in ln]  # fmt: skip
        assert lines and lines[0].endswith("2 workers on 2 nodes, from step 0"), lines
        resumed = [int(ln.rsplit(" ", 1)[1]) for ln in lines if "resuming from the checkpoint" in ln]
        assert resumed and "on 1 node" in lines[-1], lines

        summary = yaml.safe_load((workdir / "reports" / "pipeline-summary.json").read_text())
        models = {m["name"]: m for m in summary["models"]}
        assert set(models) == {"facepipe-backbone", "facepipe-probface"}, models
        assert all(summary["benchmark"][m["uri"]] for m in models.values()), summary["benchmark"]
        assert all("champion" in m["aliases"] for m in models.values()), models
        client = mlflow.MlflowClient(tracking_server)
        run = client.get_run(models["facepipe-backbone"]["run_id"])
        history = client.get_metric_history(run.info.run_id, "train/loss")
        steps = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
        assert_steps_resumed_once(steps, resumed[-1], max_steps)
        objects = _objects(f"{s3_bucket}/")
        assert any(o.endswith("/shards/manifest.json") for o in objects)  # decoded into the bucket
        assert any("/runs/backbone-" in o and o.endswith("/state.pt") for o in objects)
        assert any("/dvc/" in o for o in objects)  # the raw data's DVC remote

        again = run_deployment(stack["env"], "pipeline/local", params, 600)
        assert again.returncode == 0 and "Completed" in again.stdout, again.stdout + again.stderr
        rerun = yaml.safe_load((workdir / "reports" / "pipeline-summary.json").read_text())
        assert set(rerun["stages"].values()) == {"up to date"}, rerun["stages"]

        versions = len(client.search_model_versions("name = 'facepipe-probface'"))
        retrain = {"workdir": str(workdir), "ray_address": isolated_cluster.address,
                   "overrides": ["train_uncertainty.epochs=1"]}  # fmt: skip
        proc = run_deployment(stack["env"], "train-probface/local", retrain, 600)
        assert proc.returncode == 0 and "Completed" in proc.stdout, proc.stdout + proc.stderr
        found = client.search_model_versions("name = 'facepipe-probface'")
        assert len(found) == versions + 1
        newest = max(found, key=lambda v: int(v.version))
        assert newest.run_id in artifact_markdown(stack["env"], "train-probface")
