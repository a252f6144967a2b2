"""A single-node local Ray cluster on free ports, with token authentication."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from facepipe.errors import FacepipeError
from facepipe.services.process import ServiceHandle, _bin, _spawn, _tail, _wait_until, free_port

log = logging.getLogger(__name__)

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
    try:
        return _start_ray_head(num_cpus, temp_dir, host, timeout_s)
    except FacepipeError as err:
        # `ray start` gives its raylet 30 s to register (fixed in Ray); a machine busy compiling or
        # training can miss that once. Another try, on new ports, usually succeeds.
        if "exited with code" not in str(err):
            raise
        log.warning("Ray head did not start (%s); retrying on other ports", str(err).splitlines()[0][:200])
        return _start_ray_head(num_cpus, temp_dir, host, timeout_s)


def _start_ray_head(
    num_cpus: int | None, temp_dir: str | os.PathLike | None, host: str, timeout_s: float
) -> ServiceHandle:
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
