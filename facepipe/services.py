"""Local services for the demo and the tests: a Prefect server and worker, local Ray, MLflow, a DVC remote.

Every `start_*` returns a handle whose `stop()` ends exactly the processes that call started (each runs
in its own process group, so children such as Ray's raylet go too) and nothing else: other Ray
clusters or Prefect servers on the machine are left alone. Handles are context managers and are also
stopped at interpreter exit, so an exception between start and stop leaks nothing.

This module starts the services as command-line programs; it never imports Prefect (facepipe itself
stays free of the orchestrator).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facepipe.errors import FacepipeError

log = logging.getLogger(__name__)

_LIVE: list[ServiceHandle] = []


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it; a tiny race with other starters remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """The console script installed beside this interpreter (the venv's), else the one on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FacepipeError(f"command {name!r} not found beside {sys.executable} or on PATH")
    return found


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.is_file():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(text)


@dataclass
class ServiceHandle:
    """A started service. `stop()` is idempotent and only touches what this handle started."""

    name: str
    info: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    cleanup: Callable[[], None] | None = None
    stop_grace_s: float = 10.0
    stopped: bool = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.process is not None:
            _stop_group(self.process, self.stop_grace_s)
        if self.cleanup is not None:
            self.cleanup()
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)
        log.info("stopped %s", self.name)

    @property
    def running(self) -> bool:
        return not self.stopped and (self.process is None or self.process.poll() is None)

    def __enter__(self) -> ServiceHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __getitem__(self, key: str) -> Any:
        return self.info[key]


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group the service leads, then SIGKILL whatever is left after `grace_s`."""
    pgid = proc.pid  # started with start_new_session=True, so the service leads its own group
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # the leader exited; children in its group may linger (Ray drains for up to 30 s): end them
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


def _spawn(
    name: str, cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None
) -> ServiceHandle:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    handle = ServiceHandle(name=name, process=proc, log_path=log_path)
    _LIVE.append(handle)
    log.info("started %s (pid %d, log %s)", name, proc.pid, log_path)
    return handle


def _wait_until(
    handle: ServiceHandle, ready: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.5
) -> None:
    """Poll `ready()` until true; fail fast (with the log's tail) if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if handle.process is not None and handle.process.poll() is not None:
            message = f"{handle.name} exited with code {handle.process.returncode} before {what}"
        elif ready():
            return
        elif time.monotonic() > deadline:
            message = f"{handle.name}: no {what} after {timeout_s:.0f} s"
        else:
            time.sleep(interval_s)
            continue
        tail = _tail(handle.log_path)  # read before stop(), which may remove the log's folder
        handle.stop()
        raise FacepipeError(f"{message}; log {handle.log_path}:\n{tail}")


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """True when GET `url` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - local URLs only
            return 200 <= resp.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@atexit.register
def _stop_all() -> None:
    for handle in list(reversed(_LIVE)):
        with contextlib.suppress(Exception):
            handle.stop()


# ---------------------------------------------------------------------------------------------- Prefect


def prefect_env(api_url: str, home: str | os.PathLike) -> dict[str, str]:
    """Environment variables that point the Prefect CLI/SDK at a server (added to os.environ)."""
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # no interactive prompts from `prefect deploy` and friends when run by the demo or the tests
        PREFECT_CLI_PROMPT="false",
    )
    return env


def start_prefect_server(
    home: str | os.PathLike, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 180.0
) -> ServiceHandle:
    """A Prefect server on `host` with a SQLite database inside `home` (its PREFECT_HOME).

    info: api_url, ui_url, home, db_path, env (environment for clients: CLI, workers, flows).
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    if port is None:
        # a port the OS called free can be taken before the server binds it: then try another once
        try:
            return _start_prefect_server(home, host, free_port(host), timeout_s)
        except FacepipeError as err:
            if "exited with code" not in str(err):
                raise
            log.warning(
                "Prefect server did not start (%s); retrying on another port", str(err).splitlines()[0]
            )
            return _start_prefect_server(home, host, free_port(host), timeout_s)
    return _start_prefect_server(home, host, port, timeout_s)


def _start_prefect_server(home: Path, host: str, port: int, timeout_s: float) -> ServiceHandle:
    db_path = home / "prefect.db"
    api_url = f"http://{host}:{port}/api"
    env = prefect_env(api_url, home)
    env.pop("PREFECT_API_URL")  # the server itself must not try to talk to another server
    env.update(
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{db_path}",
        PREFECT_SERVER_API_HOST=host,
        PREFECT_SERVER_API_PORT=str(port),
    )
    cmd = [_bin("prefect"), "server", "start", "--host", host, "--port", str(port)]
    handle = _spawn(f"prefect server {host}:{port}", cmd, env, home / "server.log")
    handle.info.update(
        api_url=api_url,
        ui_url=f"http://{host}:{port}",
        home=str(home),
        db_path=str(db_path),
        env=prefect_env(api_url, home),
    )
    _wait_until(handle, lambda: http_ok(f"{api_url}/health"), timeout_s, "healthy API")
    return handle


def run_prefect(
    args: list[str], env: dict[str, str], cwd: str | os.PathLike | None = None, timeout_s: float = 300.0
) -> str:
    """Run one `prefect ...` CLI command against a server; raise with its output when it fails."""
    proc = subprocess.run(
        [_bin("prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s
    )
    if proc.returncode != 0:
        raise FacepipeError(
            f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def ensure_process_pool(name: str, env: dict[str, str]) -> None:
    """Create the process work pool `name` if the server does not have it yet."""
    probe = subprocess.run(
        [_bin("prefect"), "work-pool", "inspect", name], env=env, capture_output=True, text=True, timeout=120
    )
    if probe.returncode != 0:
        run_prefect(["work-pool", "create", name, "--type", "process"], env)


def start_prefect_worker(
    pool: str,
    env: dict[str, str],
    log_path: str | os.PathLike,
    cwd: str | os.PathLike | None = None,
    timeout_s: float = 120.0,
) -> ServiceHandle:
    """A process worker polling `pool` (created when missing); flow runs execute as its children."""
    ensure_process_pool(pool, env)
    cmd = [_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process"]
    handle = _spawn(
        f"prefect worker ({pool})", cmd, dict(env), Path(log_path), cwd=Path(cwd) if cwd else None
    )
    # a worker holding flow runs can ignore SIGINT for a while; don't wait long before SIGKILL
    handle.stop_grace_s = 5.0
    handle.info.update(pool=pool)
    _wait_until(handle, lambda: "started" in _tail(handle.log_path, 200), timeout_s, "worker start")
    return handle


# ------------------------------------------------------------------------------------------------- Ray


def start_ray_head(
    num_cpus: int | None = None,
    temp_dir: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    timeout_s: float = 180.0,
) -> ServiceHandle:
    """A single-node Ray cluster on `host`, on free ports (other clusters on the machine are untouched).

    Token authentication is on, with a token of its own (Ray enables it anyway when ~/.ray/auth_token
    exists, and then every client needs to know): clients connect with `info["env"]` in their
    environment (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH), e.g. `os.environ.update(handle["env"])`.
    info: address (for `ray.init(address=...)` and the flows' `ray_address`), env, temp_dir.
    """
    made_temp = temp_dir is None
    # Ray's socket paths must stay under ~107 bytes, so the default is a short folder in /tmp
    temp = Path(temp_dir) if temp_dir else Path(tempfile.mkdtemp(prefix="fpray"))
    temp.mkdir(parents=True, exist_ok=True)
    port = free_port(host)
    cmd = [
        _bin("ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", host, "--port", str(port),
        "--ray-client-server-port", str(free_port(host)),
        "--dashboard-host", host, "--dashboard-port", str(free_port(host)),
        "--dashboard-agent-listen-port", str(free_port(host)),
        "--temp-dir", str(temp),
    ]  # fmt: skip
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    token_path = temp / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    env = {**os.environ, **client_env}
    env.pop("RAY_ADDRESS", None)
    handle = _spawn(f"ray head {host}:{port}", cmd, env, temp / "ray-start.log")
    handle.stop_grace_s = 5.0
    if made_temp:
        handle.cleanup = lambda: shutil.rmtree(temp, ignore_errors=True)
    address = f"{host}:{port}"
    handle.info.update(address=address, env=client_env, temp_dir=str(temp))
    _wait_until(
        handle, lambda: "Ray runtime started" in _tail(handle.log_path, 200), timeout_s, "Ray runtime"
    )
    return handle


# ---------------------------------------------------------------------------------------------- MLflow


def mlflow_local(root: str | os.PathLike) -> ServiceHandle:
    """MLflow on SQLite in `root`: nothing runs, so stop() has nothing to end.

    info: tracking_uri (sqlite:///<root>/mlflow.db), artifacts (<root>/artifacts), ui_command.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    artifacts = root / "artifacts"
    info = {
        "tracking_uri": tracking_uri,
        "artifacts": str(artifacts),
        "ui_command": f"mlflow ui --backend-store-uri {tracking_uri} --default-artifact-root {artifacts}",
    }
    return ServiceHandle(name="mlflow (sqlite)", info=info)


def start_mlflow_server(
    backend_uri: str,
    artifacts_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int | None = None,
    log_path: str | os.PathLike | None = None,
    timeout_s: float = 180.0,
) -> ServiceHandle:
    """An MLflow tracking server (UI + REST + artifact proxy) over `backend_uri`. info: url."""
    port = port or free_port(host)
    artifacts = Path(artifacts_dir).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        _bin("mlflow"), "server", "--host", host, "--port", str(port), "--workers", "1",
        "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
    ]  # fmt: skip
    handle = _spawn(
        f"mlflow server {host}:{port}",
        cmd,
        dict(os.environ),
        Path(log_path or artifacts.parent / "mlflow.log"),
    )
    url = f"http://{host}:{port}"
    handle.info.update(url=url, tracking_uri=url)
    _wait_until(handle, lambda: http_ok(f"{url}/health"), timeout_s, "healthy server")
    return handle


# ------------------------------------------------------------------------------------------------- DVC


def _dvc(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    proc = subprocess.run([_bin("dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise FacepipeError(
            f"dvc {' '.join(args)} in {cwd} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def ensure_dvc_repo(
    workdir: str | os.PathLike, remote_dir: str | os.PathLike, remote_name: str = "local"
) -> ServiceHandle:
    """Make `workdir` a DVC project whose default remote is the folder `remote_dir`.

    A git work tree root gets a normal `dvc init`; any other folder (e.g. a demo folder inside a clone)
    gets `dvc init --no-scm`, so its files never touch the surrounding repository. Nothing runs, so the
    handle's stop() is a no-op. info: root, remote, remote_url.
    """
    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    remote = Path(remote_dir).resolve()
    remote.mkdir(parents=True, exist_ok=True)
    if not (root / ".dvc").is_dir():
        _dvc(["init"] if (root / ".git").exists() else ["init", "--no-scm"], root)
        _dvc(["config", "core.analytics", "false"], root)
    _dvc(["remote", "add", "--default", "--force", remote_name, str(remote)], root)
    return ServiceHandle(
        name=f"dvc remote {remote_name}",
        info={"root": str(root), "remote": remote_name, "remote_url": str(remote)},
    )
