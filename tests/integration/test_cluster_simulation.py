"""A cluster that fails where a real one would: the second Ray node shares no disk with the driver.

The second node runs in its own mount namespace (`unshare -m`) in which the driver's temp folders
(pytest's, where every test keeps its data, and the head's Ray temp dir) are empty tmpfs mounts, with
its own working directory, temp dir and HOME. A local path handed from the driver to a worker there
does not exist, as on a real cluster: shared state has to go through object storage (a moto S3
server) or the tracking server (MLflow over HTTP). Only the code is shared, as a cluster image would.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from facepipe import storage
from facepipe.errors import FacepipeError
from facepipe.train.mailbox import read_events
from tests.integration.conftest import (
    RAY,
    LocalCluster,
    _kill_leftovers,
    _node_args,
    _wait_for_nodes,
    assert_resumed_once,
    driver_env,
    free_port,
    small_config,
)
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class IsolatedCluster:
    address: str
    node: subprocess.Popen  # `ray start --block` of the isolated node

    def kill_node_raylet(self) -> int:
        """SIGKILL the isolated node's raylet (a child of its `ray start`), as a machine that dies."""
        import psutil

        raylet = next(p for p in psutil.Process(self.node.pid).children() if p.name() == "raylet")
        raylet.kill()
        return raylet.pid


def _pytest_temp_root(tmp_path_factory) -> Path:
    """The folder right below the system temp dir that holds every pytest temp path of this run."""
    base, system = tmp_path_factory.getbasetemp().resolve(), Path(tempfile.gettempdir()).resolve()
    while base.parent != system:
        base = base.parent
    return base


def _namespaces_allowed() -> bool:
    probe = ["unshare", "-m", "--propagation", "private", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="module")
def isolated_cluster(tmp_path_factory):
    import ray

    if not _namespaces_allowed():
        if os.environ.get("CI") == "true":
            pytest.fail("unshare -m is refused here: the cluster simulation needs a mount namespace")
        pytest.skip("unshare -m is refused here: the cluster simulation needs a mount namespace")
    if ray.is_initialized():
        ray.shutdown()
    head_tmp = Path(tempfile.mkdtemp(prefix="fpih", dir="/tmp"))  # short: socket paths are capped
    node_root = Path(tempfile.mkdtemp(prefix="fpin", dir="/tmp"))
    for sub in ("home", "work", "tmp"):
        (node_root / sub).mkdir()
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        # the ray_cluster fixture's token where this process has one: Ray caches the first it reads
        "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or os.urandom(32).hex(),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "RAY_DEDUP_LOGS": "1",
        "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    }
    env.pop("RAY_ADDRESS", None)
    cluster = LocalCluster(address, env, head_tmp)
    logs = node_root / "logs"
    logs.mkdir()
    try:
        head = [RAY, "start", "--head", f"--port={port}", f"--temp-dir={head_tmp}"]
        head += ["--include-dashboard=false", *_node_args(head_tmp)]
        with open(logs / "head.log", "w") as out:
            cluster.procs.append(subprocess.Popen(head, env=env, stdout=out, stderr=subprocess.STDOUT))
        _wait_for_nodes(address, env, 1)
        hidden = [_pytest_temp_root(tmp_path_factory), head_tmp]
        mounts = " && ".join(f"mount -t tmpfs -o size=512m none {shlex.quote(str(p))}" for p in hidden)
        start = shlex.join([RAY, "start", f"--address={address}", *_node_args(head_tmp)])
        script = f"{mounts} && cd {shlex.quote(str(node_root / 'work'))} && exec {start}"
        node_env = {**env, "HOME": str(node_root / "home"), "TMPDIR": str(node_root / "tmp")}
        node_env.pop("PWD", None)
        state: dict[str, subprocess.Popen] = {}

        def isolated_node() -> None:
            if "node" in state and state["node"].poll() is None:
                return  # running (or still joining)
            with open(logs / "node.log", "a") as out:
                state["node"] = subprocess.Popen(
                    ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                    env=node_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            cluster.procs.append(state["node"])

        _wait_for_nodes(address, env, 2, node=isolated_node)
        with driver_env(env):
            yield IsolatedCluster(address, state["node"])
    finally:
        cluster.stop()  # both `ray start --block` processes, then anything left under head_tmp
        _kill_leftovers(node_root)
        subprocess.run(["rm", "-rf", str(node_root)], check=False)


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


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """MLflow over HTTP with basic auth on: the driver and (forwarded by Ray) the workers log in with
    the standard MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; a request without them is refused."""
    import secrets
    import urllib.error
    import urllib.request

    from facepipe.services import start_mlflow_server

    login = {"MLFLOW_TRACKING_USERNAME": "facepipe-ci", "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(12)}
    saved = {k: os.environ.get(k) for k in login}
    os.environ.update(login)
    root = tmp_path_factory.mktemp("mlflow-server")
    server = start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", auth=True)
    try:
        url = server.info["url"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")  # noqa: S310
        assert refused.value.code == 401
        yield url
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_a_local_path_does_not_reach_the_other_node(
    isolated_cluster,
    sample_dataset,
    s3_bucket,  # noqa: F811
    tracking_server,
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
    isolated_cluster,
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


def test_the_isolated_node_really_sees_other_folders(isolated_cluster, sample_dataset, tmp_path):
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


# last: it kills the isolated node, which the module's other tests need
def test_training_survives_losing_a_node_that_shares_no_disk(
    isolated_cluster,
    sample_dataset,
    s3_bucket,  # noqa: F811
    tracking_server,
    tmp_path,
):
    import mlflow
    import ray

    from facepipe.cli import main
    from facepipe.train.backbone import train_backbone

    shards = f"{s3_bucket}/shards"
    assert main(["decode", str(sample_dataset / "raw"), shards]) == 0
    config = _spread_config(sample_dataset, tmp_path, isolated_cluster.address, s3_bucket, tracking_server)
    tb = config.train_backbone
    tb.max_steps, tb.epochs = 24, 6  # 5 steps an epoch on the sample dataset
    events_path = tmp_path / "events.jsonl"
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = train_backbone(config, shards, run_name="spread", events_path=events_path)
        except BaseException as err:  # noqa: BLE001 - surfaced by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=train)
    thread.start()
    deadline, killed, first_seen = time.monotonic() + 300, None, {}
    while time.monotonic() < deadline and thread.is_alive() and killed is None:
        events = read_events(events_path)
        starts = [e for e in events if e["event"] == "start"]
        checkpoints = [e["step"] for e in events if e["event"] == "checkpoint"]
        steps = [e["step"] for e in events if e["event"] == "step"]
        for step in checkpoints:
            first_seen.setdefault(step, time.monotonic())
        # a reported checkpoint is registered at the controller's next health check: let it settle
        settled = checkpoints and time.monotonic() - first_seen[checkpoints[0]] >= 1.0
        if settled and steps and steps[-1] > checkpoints[-1] and steps[-1] < tb.max_steps - 3:
            assert len({e["node"] for e in starts}) == 2, starts  # SPREAD: one worker per node
            killed = isolated_cluster.kill_node_raylet()
        time.sleep(0.05)
    assert killed is not None, "never reached a point to kill the node"
    thread.join(timeout=400)
    assert not thread.is_alive(), "training did not finish after losing the node"
    assert "error" not in outcome, outcome.get("error")

    events = read_events(events_path)
    starts = [e for e in events if e["event"] == "start"]
    resumed_at = starts[-1]["step"]
    assert len(starts) == 4 and resumed_at > 0, starts  # two workers, two attempts
    head = {n["NodeID"] for n in ray.nodes() if n["Alive"]} if ray.is_initialized() else None
    assert head is None or {e["node"] for e in starts[2:]} <= head  # the second attempt: survivors only
    checkpoints = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert resumed_at in checkpoints
    assert_resumed_once(events, resumed_at, tb.max_steps)
    fs, root = storage.resolve(f"{s3_bucket}/runs/spread")
    objects = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))]
    assert any(o.endswith("/state.pt") for o in objects), objects  # checkpoints in the bucket
    assert outcome["result"].metrics["step"] == tb.max_steps
    run = mlflow.MlflowClient(tracking_server).get_run(outcome["result"].run_id)
    assert run.data.metrics, "rank 0 logged nothing to the tracking server"
