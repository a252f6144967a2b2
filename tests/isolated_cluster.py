"""A Ray cluster whose second node shares no disk with the driver, and an MLflow server with auth.

The second node runs in its own mount namespace (`unshare -m`) in which the driver's temp folders
(pytest's, where every test keeps its data, and the head's Ray temp dir) are empty tmpfs mounts, with
its own working directory, temp dir and HOME. A local path handed from the driver to a worker there
does not exist, as on a real cluster: shared state has to go through object storage (a moto S3
server) or the tracking server (MLflow over HTTP). Only the code is shared, as a cluster image would.
Import the fixtures into a test module (`from tests.isolated_cluster import isolated_cluster, …`).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import (
    RAY,
    LocalCluster,
    _kill_leftovers,
    _node_args,
    _wait_for_nodes,
    driver_env,
    environ,
    free_port,
)


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


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """MLflow over HTTP with basic auth on: the driver and (forwarded by Ray) the workers log in with
    the standard MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; a request without them is refused."""
    import secrets
    import urllib.error
    import urllib.request

    from facepipe.services import start_mlflow_server

    login = {"MLFLOW_TRACKING_USERNAME": "facepipe-ci", "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(12)}
    root = tmp_path_factory.mktemp("mlflow-server")
    with environ(login):
        server = start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", auth=True)
        try:
            url = server.info["url"]
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")  # noqa: S310
            assert refused.value.code == 401
            yield url
        finally:
            server.stop()
