"""Prefect for real in tests: a server on 127.0.0.1 (SQLite, its own PREFECT_HOME), `prefect deploy`
of prefect.yaml's deployments, a process worker, and `prefect deployment run … --watch`.

`prefect_stack(home, names)` starts all of it and stops exactly what it started. The worker (and so
every flow run) gets this process's environment as it is when the stack starts: a test that needs
its flow runs to see an S3 endpoint or a tracking-server login starts the stack after setting them.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from facepipe import services
from facepipe.services.prefect_server import prefect_env

REPO = Path(__file__).resolve().parents[1]
POOL = "facepipe-process"


@contextlib.contextmanager
def prefect_stack(home: Path, deployments: list[str]) -> Iterator[dict[str, Any]]:
    """Server + the named deployments (`flow/deployment` of prefect.yaml) + a process worker."""
    before = (REPO / "prefect.yaml").read_text()
    server = services.start_prefect_server(home)
    worker = None
    try:
        # the worker asks for scheduled runs every 2 s (default 10): each run here starts sooner
        env = {**prefect_env(server.info["api_url"], home), "PREFECT_WORKER_QUERY_SECONDS": "2"}
        services.ensure_process_pool(POOL, env)
        args = ["--no-prompt", "deploy", "--prefect-file", "prefect.yaml"]
        for name in deployments:
            args += ["--name", name]
        services.run_prefect(args, env, cwd=REPO)
        worker = services.start_prefect_worker(POOL, env, home / "worker.log", cwd=REPO)
        yield {"server": server, "worker": worker, "env": env, "home": home}
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
        assert (REPO / "prefect.yaml").read_text() == before, "prefect deploy must not rewrite prefect.yaml"


def run_deployment(
    env: dict[str, str], name: str, params: dict[str, Any], timeout_s: int = 300
) -> subprocess.CompletedProcess:
    """`prefect deployment run NAME --watch` with JSON parameters; the finished command."""
    args = [services._bin("prefect"), "deployment", "run", name, "--watch", "--watch-interval", "1"]
    args += ["--watch-timeout", str(timeout_s)]
    for key, value in params.items():
        args += ["--param", f"{key}={json.dumps(value)}"]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s + 60)


def artifact_markdown(env: dict[str, str], key: str) -> str:
    """The latest markdown artifact a flow run published under `key`."""
    import httpx

    api = env["PREFECT_API_URL"]
    found = httpx.post(f"{api}/artifacts/latest/filter", json={"artifacts": {"key": {"any_": [key]}}}).json()
    return "\n".join(a.get("data") or "" for a in found)


def worker_log(stack: dict[str, Any]) -> str:
    path = Path(stack["home"]) / "worker.log"
    return path.read_text(errors="replace")[-6000:] if path.is_file() else ""
