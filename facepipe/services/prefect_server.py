"""A Prefect server (SQLite) and a process worker, started as command-line programs."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from facepipe.errors import FacepipeError
from facepipe.services.process import ServiceHandle, _bin, _spawn, _tail, _wait_until, free_port, http_ok

log = logging.getLogger(__name__)

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
