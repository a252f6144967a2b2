"""Prefect for real: a server on 127.0.0.1 (SQLite, temporary PREFECT_HOME), `prefect deploy` from
prefect.yaml, a process worker, `prefect deployment run '<flow>/<deployment>' --watch`.

Also the other local services the demo starts (facepipe.services): local Ray and their clean stop.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from facepipe import services
from facepipe.errors import FacepipeError
from tests.prefect_stack import REPO, artifact_markdown, run_deployment
from tests.prefect_stack import prefect_stack as start_prefect_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def group_alive(pgid: int) -> list[str]:
    """Live (non-zombie) processes of a process group."""
    out = subprocess.run(["ps", "-eo", "pgid=,stat=,comm="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    return [r[2] for r in rows if len(r) == 3 and r[0] == str(pgid) and not r[1].startswith("Z")]


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory):
    """Server + deployments of prefect.yaml's `local` variants + a process worker; all stopped after."""
    names = ["ingest/local", "train-backbone/local", "train-probface/local"]
    with start_prefect_stack(tmp_path_factory.mktemp("prefect-home"), names) as stack:
        yield stack


def flow_run_states(env: dict, flow_name: str) -> list[str]:
    """States of the runs of `flow_name`, read back from the server's API."""
    import httpx

    api = env["PREFECT_API_URL"]
    flows = httpx.post(f"{api}/flows/filter", json={"flows": {"name": {"any_": [flow_name]}}}).json()
    runs = httpx.post(
        f"{api}/flow_runs/filter", json={"flows": {"id": {"any_": [f["id"] for f in flows]}}}
    ).json()
    return [r["state"]["type"] for r in runs]


def make_raw_dataset(recordio_dir: Path, raw: Path) -> None:
    """An InsightFace-layout dataset from the MXNet-written fixtures (12 classes, 60 images, 20 pairs)."""
    raw.mkdir(parents=True)
    shutil.copy(recordio_dir / "tiny_train.rec", raw / "train.rec")
    shutil.copy(recordio_dir / "tiny_train.idx", raw / "train.idx")
    shutil.copy(recordio_dir / "property", raw / "property")
    shutil.copy(recordio_dir / "tiny_val.bin", raw / "tiny_val.bin")


def small_params(workdir: Path, overrides: dict) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_ingest_deployment_versions_and_decodes_then_skips_on_rerun(prefect_stack, recordio_dir, tmp_path):
    workdir = tmp_path / "work"
    make_raw_dataset(recordio_dir, workdir / "data" / "raw")
    small_params(workdir, {"decode.workers": 1, "decode.target_mb": 1})
    dvc = services.ensure_dvc_repo(workdir, tmp_path / "dvc-remote")
    params = {"workdir": str(workdir), "params": "params.yaml"}

    proc = run_deployment(prefect_stack["env"], "ingest/local", params)
    assert proc.returncode == 0 and "Completed" in proc.stdout, proc.stdout + proc.stderr
    # DVC versioned the raw data and pushed it to the remote
    dvc_file = yaml.safe_load((workdir / "data" / "raw.dvc").read_text())
    md5 = dvc_file["outs"][0]["md5"]
    assert md5.endswith(".dir") and dvc_file["outs"][0]["nfiles"] == 4
    assert any(Path(dvc["remote_url"]).rglob("*")), "dvc push left the remote empty"
    # decode wrote the shards and a completed-stage marker
    manifest = json.loads((workdir / "data" / "shards" / "manifest.json").read_text())
    assert manifest["num_images"] == 60 and manifest["num_classes"] == 12
    marker = workdir / ".facepipe" / "stages" / "decode.json"
    first = json.loads(marker.read_text())

    proc = run_deployment(prefect_stack["env"], "ingest/local", params)
    assert proc.returncode == 0 and "Completed" in proc.stdout, proc.stdout + proc.stderr
    assert json.loads(marker.read_text())["finished"] == first["finished"], "decode ran again"
    assert (workdir / ".facepipe" / "logs" / "decode.log").read_text().count("facepipe decode: done") == 1
    assert flow_run_states(prefect_stack["env"], "ingest").count("COMPLETED") >= 2
    links = artifact_markdown(prefect_stack["env"], "ingest")
    assert md5 in links and "| decode | up to date (skipped)" in links, links


def test_a_failing_flow_run_is_reported_failed(prefect_stack, tmp_path):
    """A missing dataset is a user error: the run ends Failed (no retry loop), and --watch says so."""
    workdir = tmp_path / "empty"
    workdir.mkdir()
    small_params(workdir, {})
    proc = run_deployment(
        prefect_stack["env"], "ingest/local", {"workdir": str(workdir), "version_data": False}
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Flow run finished in state 'Failed'" in proc.stdout + proc.stderr


# `train-probface/local` registering a new version, on a cluster with data on S3: see
# test_cluster_simulation.test_pipeline_deployment_on_s3_survives_losing_a_node


# ------------------------------------------------------------------------------- other services


def test_local_ray_head_serves_clients_and_stops_completely(tmp_path):
    with services.start_ray_head(num_cpus=1) as ray_head:
        pgid = ray_head.process.pid
        assert group_alive(pgid), "no Ray processes"
        code = "import ray; ray.init(address='{}'); print(int(ray.cluster_resources()['CPU']))"
        out = subprocess.run(
            [sys.executable, "-c", code.format(ray_head["address"])],
            env={**os.environ, **ray_head["env"]},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "1", out.stderr[-2000:]
        temp_dir = Path(ray_head["temp_dir"])
    deadline = time.monotonic() + 30
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not group_alive(pgid), f"left running: {group_alive(pgid)}"
    assert not temp_dir.exists()


def test_a_service_that_dies_at_start_is_reported_with_its_log(tmp_path):
    handle = services._spawn(
        "doomed", [sys.executable, "-c", "print('cannot bind'); raise SystemExit(3)"], dict(os.environ),
        tmp_path / "doomed.log",
    )  # fmt: skip
    with pytest.raises(FacepipeError, match=r"exited with code 3[\s\S]*cannot bind"):
        services._wait_until(handle, lambda: False, 30, "health")
    assert handle.stopped


def test_mlflow_local_and_dvc_repo_handles(tmp_path):
    ml = services.mlflow_local(tmp_path / "mlflow")
    assert ml["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    dvc = services.ensure_dvc_repo(tmp_path / "wd", tmp_path / "remote")
    again = services.ensure_dvc_repo(tmp_path / "wd", tmp_path / "remote")  # idempotent
    assert (tmp_path / "wd" / ".dvc").is_dir() and dvc.info == again.info
    config = (tmp_path / "wd" / ".dvc" / "config").read_text()
    assert "remote = local" in config and str(tmp_path / "remote") in config
    dvc.stop()
    ml.stop()


def test_cron_schedule_puts_the_next_retraining_on_the_server(prefect_stack):
    """The server's scheduler turns train-probface's cron into scheduled runs (Mondays 03:00 UTC)."""
    import datetime as dt

    import httpx

    api = prefect_stack["env"]["PREFECT_API_URL"]
    deployment = httpx.get(f"{api}/deployments/name/train-probface/local").json()
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * 1"]
    query = {
        "deployments": {"id": {"any_": [deployment["id"]]}},
        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
    }
    deadline = time.monotonic() + 150  # the scheduler loop runs every 60 s
    runs = []
    while not runs and time.monotonic() < deadline:
        runs = httpx.post(f"{api}/flow_runs/filter", json=query).json()
        if not runs:
            time.sleep(5)
    assert runs, "the scheduler created no scheduled run"
    for run in runs:
        start = dt.datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00"))
        assert (start.weekday(), start.hour, start.minute) == (0, 3, 0), start
