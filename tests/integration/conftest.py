"""Integration fixtures: a real two-node Ray cluster on 127.0.0.1, a small sample dataset, MLflow on SQLite.

The cluster is started with the ordinary CLI (`ray start --head`, then `ray start --address` for the
second node), each in `--block` mode so that terminating the command stops exactly that node's
processes: nothing here runs `ray stop`, which would stop every Ray instance of the user (other test
sessions included). A sweep for left-over processes started under this cluster's own temp dir
follows. Token authentication is on (Ray 2.60 needs `RAY_AUTH_MODE=token` on the joining node); the
token is a random one passed through the environment, never written to ~/.ray.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))
CPUS_PER_NODE = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalCluster:
    address: str
    env: dict[str, str]
    temp_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _kill_leftovers(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _kill_leftovers(temp_dir: Path) -> None:
    """Processes whose command line names this cluster's temp dir (ours alone), by pid."""
    import psutil

    marker = str(temp_dir)
    me = os.getpid()
    victims = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != me and any(marker in part for part in proc.info["cmdline"] or []):
                victims.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(victims, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def _reload_ray_auth() -> None:
    """Ray reads its auth mode and token once per process and caches them; read them again from the
    environment just set (by a cluster fixture of this process), as a process started now would."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def environ(updates: dict[str, str]):
    """os.environ with `updates` for the block; the previous values (or their absence) restored after."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def driver_env(env: dict[str, str]):
    """This process as a driver of the cluster `env` describes: its RAY_* variables set (and Ray's
    cached auth reloaded) for the block; Ray shut down and the variables restored after it."""
    try:
        with environ({k: v for k, v in env.items() if k.startswith("RAY_")}):
            _reload_ray_auth()
            try:
                yield
            finally:
                import ray

                if ray.is_initialized():
                    ray.shutdown()
    finally:
        _reload_ray_auth()


def _node_args(temp_dir: Path) -> list[str]:
    # every port explicit and free: several nodes (and other sessions' clusters) share this host
    return [
        f"--num-cpus={CPUS_PER_NODE}",
        "--node-ip-address=127.0.0.1",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
        "--block",
    ]


def _wait_for_nodes(
    address: str, env: dict[str, str], count: int, timeout: float = 180.0, node: Callable | None = None
) -> None:
    """Until `count` nodes are alive. `node()` (re)starts the joining node's process when it has exited:
    `ray start` gives its raylet a fixed 30 s to register, which a busy 2-core machine can miss."""
    script = (
        "import ray, sys\n"
        f"ray.init(address='{address}', log_to_driver=False)\n"
        "print(sum(1 for n in ray.nodes() if n['Alive']))\n"
    )
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if node is not None:
            node()
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]
        if out.returncode == 0 and last.isdigit() and int(last) >= count:
            return
        time.sleep(2)
    raise RuntimeError(f"Ray cluster at {address} did not reach {count} nodes: {last}")


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-node local Ray cluster (2 CPUs each); the test process is attached to it as the driver."""
    temp_dir = Path(
        tempfile.mkdtemp(prefix="fpray", dir="/tmp")
    )  # short: Ray's socket paths are length-capped
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "RAY_DEDUP_LOGS": "1",
        "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    }
    env.pop("RAY_ADDRESS", None)
    logs = temp_dir / "logs"
    logs.mkdir()
    cluster = LocalCluster(address, env, temp_dir)
    try:
        head = [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
            *_node_args(temp_dir),
        ]
        cluster.procs.append(
            subprocess.Popen(
                head,
                env=env,
                stdout=open(logs / "head.log", "w"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
        )
        _wait_for_nodes(address, env, 1)

        def worker_node() -> None:
            if cluster.procs[-1] is not head_proc and cluster.procs[-1].poll() is None:
                return  # running (or still joining)
            worker = [RAY, "start", f"--address={address}", *_node_args(temp_dir)]  # fresh ports
            cluster.procs.append(
                subprocess.Popen(
                    worker,
                    env=env,
                    stdout=open(logs / "worker.log", "a"),  # noqa: SIM115
                    stderr=subprocess.STDOUT,
                )
            )

        head_proc = cluster.procs[-1]
        _wait_for_nodes(address, env, 2, node=worker_node)
        with driver_env(env):
            yield cluster
    finally:
        cluster.stop()


def assert_resumed_once(events: list[dict], resumed_at: int, max_steps: int) -> None:
    """Rank 0's step events: see `assert_steps_resumed_once`."""
    restart = next(i for i, e in enumerate(events) if e["event"] == "start" and e["step"] == resumed_at)
    before = [e["step"] for e in events[:restart] if e["event"] == "step"]
    after = [e["step"] for e in events[restart:] if e["event"] == "step"]
    _assert_no_step_lost(before, after, resumed_at, max_steps)


def assert_steps_resumed_once(steps: list[int], resumed_at: int, max_steps: int) -> None:
    """Steps in the order they were logged, one restart among them: 1.. before the restart, then
    resumed_at+1..max_steps once each; only steps past the checkpoint it resumed from ran twice."""
    steps = [s for i, s in enumerate(steps) if i == 0 or s != steps[i - 1]]  # a step's epoch-end line
    restart = next((i for i in range(1, len(steps)) if steps[i] < steps[i - 1]), len(steps))
    if restart == len(steps):  # the restart came right at a checkpoint: nothing ran twice
        restart = steps.index(resumed_at + 1) if resumed_at + 1 in steps else len(steps)
    _assert_no_step_lost(steps[:restart], steps[restart:], resumed_at, max_steps)


def _assert_no_step_lost(before: list[int], after: list[int], resumed_at: int, max_steps: int) -> None:
    assert before == list(range(1, len(before) + 1))
    assert after == list(range(resumed_at + 1, max_steps + 1))  # nothing lost after the restart
    assert all(s > resumed_at for s in set(before) & set(after))


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> Path:
    """A small generated InsightFace-layout dataset, decoded into shards + pair tables."""
    from facepipe.data.decode.job import decode_dataset
    from facepipe.data.synth.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("sample")
    generate(root / "raw", SynthConfig(identities=40, images_per_identity=8, pairs=100, size=64, seed=3))
    decode_dataset([root / "raw"], root / "shards", workers=1)
    return root


def small_config(root: Path, tmp: Path, address: str | None):
    """A CPU-sized configuration: tiny backbone, few steps, MLflow on SQLite under `tmp`."""
    from facepipe.config import Config

    config = Config()
    config.paths.shards = str(root / "shards")
    config.paths.raw = str(root / "raw")
    config.paths.runs = str(tmp / "runs")
    config.paths.features = str(tmp / "features")
    config.tracking.tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    config.tracking.artifact_location = str(tmp / "artifacts")
    tb = config.train_backbone
    tb.backbone.name = "iresnet_tiny"
    tb.backbone.input_size = (32, 32)
    tb.backbone.embedding_size = 64
    tb.batch_size = 32
    tb.epochs = 3
    tb.optim.lr = 3e-3
    tb.checkpoint_every_steps = 3
    tb.log_every_steps = 1
    tb.loader.workers = 1
    tb.loader.prefetch = 2
    for section in (tb.scaling, config.train_uncertainty.scaling, config.finetune.scaling):
        section.address = address
        section.num_workers = 2 if section is tb.scaling else 1
        section.cpus_per_worker = 1
    tu = config.train_uncertainty
    tu.epochs = 2
    tu.classes_per_batch = 8
    tu.images_per_class = 4
    tu.batch_size = 32
    return config
