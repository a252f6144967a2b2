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

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
POOL = "facepipe-process"


def group_alive(pgid: int) -> list[str]:
    """Live (non-zombie) processes of a process group."""
    out = subprocess.run(["ps", "-eo", "pgid=,stat=,comm="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    return [r[2] for r in rows if len(r) == 3 and r[0] == str(pgid) and not r[1].startswith("Z")]


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory):
    """Server + deployments of prefect.yaml's `local` variants + a process worker; all stopped after."""
    home = tmp_path_factory.mktemp("prefect-home")
    before = (REPO / "prefect.yaml").read_text()
    server = services.start_prefect_server(home)
    worker = None
    try:
        # the worker asks for scheduled runs every 2 s (default 10): each run here starts sooner
        env = {**server["env"], "PREFECT_WORKER_QUERY_SECONDS": "2"}
        services.ensure_process_pool(POOL, env)
        names = ["ingest/local", "train-backbone/local", "train-probface/local"]
        args = ["--no-prompt", "deploy", "--prefect-file", "prefect.yaml"]
        for name in names:
            args += ["--name", name]
        services.run_prefect(args, env, cwd=REPO)
        worker = services.start_prefect_worker(POOL, env, home / "worker.log", cwd=REPO)
        yield {"server": server, "worker": worker, "env": env, "home": home}
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
        assert (REPO / "prefect.yaml").read_text() == before, "prefect deploy must not rewrite prefect.yaml"


def run_deployment(env: dict, name: str, params: dict, timeout_s: int = 300) -> subprocess.CompletedProcess:
    args = [services._bin("prefect"), "deployment", "run", name, "--watch", "--watch-interval", "1"]
    args += ["--watch-timeout", str(timeout_s)]
    for key, value in params.items():
        args += ["--param", f"{key}={json.dumps(value)}"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s + 60)
    return proc


def flow_run_states(env: dict, flow_name: str) -> list[str]:
    """States of the runs of `flow_name`, read back from the server's API."""
    import httpx

    api = env["PREFECT_API_URL"]
    flows = httpx.post(f"{api}/flows/filter", json={"flows": {"name": {"any_": [flow_name]}}}).json()
    runs = httpx.post(
        f"{api}/flow_runs/filter", json={"flows": {"id": {"any_": [f["id"] for f in flows]}}}
    ).json()
    return [r["state"]["type"] for r in runs]


def artifact_markdown(env: dict, key: str) -> str:
    """The latest markdown artifact a flow run published under `key`."""
    import httpx

    api = env["PREFECT_API_URL"]
    found = httpx.post(f"{api}/artifacts/latest/filter", json={"artifacts": {"key": {"any_": [key]}}}).json()
    return "\n".join(a.get("data") or "" for a in found)


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


def test_train_probface_deployment_registers_a_new_version(prefect_stack, tmp_path):
    from mlflow import MlflowClient

    workdir = tmp_path / "train"
    workdir.mkdir()
    tiny = {
        "synth.identities": 40, "synth.images_per_identity": 6, "synth.pairs": 200, "synth.workers": 1,
        "decode.workers": 1, "train_backbone.epochs": 1, "train_backbone.scaling.num_workers": 1,
        "train_backbone.batch_size": 32, "train_uncertainty.epochs": 1,
        "train_uncertainty.classes_per_batch": 8, "train_uncertainty.images_per_class": 2,
    }  # fmt: skip
    small_params(workdir, tiny)
    env = dict(prefect_stack["env"], RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    cli = [sys.executable, "-m", "facepipe"]
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    for argv in (["synth", "data/raw", "--identities", "40", "--images-per-identity", "6", "--pairs", "200"],
                 ["decode", "data/raw", "data/shards", "--workers", "1"],
                 ["train", "backbone", "--name", "bb", f"tracking.tracking_uri={tracking}"]):  # fmt: skip
        subprocess.run(cli + argv, cwd=workdir, env=env, check=True, timeout=600)

    mlc = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    before = (
        len(mlc.search_model_versions("name = 'facepipe-probface'")) if mlc.search_registered_models() else 0
    )

    proc = run_deployment(
        env, "train-probface/local", {"workdir": str(workdir), "params": "params.yaml"}, 900
    )
    assert proc.returncode == 0 and "Completed" in proc.stdout, proc.stdout + proc.stderr

    versions = mlc.search_model_versions("name = 'facepipe-probface'")
    assert len(versions) == before + 1
    newest = mlc.get_model_version("facepipe-probface", max(v.version for v in versions))
    assert {"challenger", "champion"} & set(newest.aliases)
    # the flow run links to the MLflow run that logged the new version
    links = artifact_markdown(env, "train-probface")
    assert newest.run_id in links, links


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
