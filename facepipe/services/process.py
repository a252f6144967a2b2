"""Started processes: a handle that stops exactly what it started, free ports, waiting for readiness."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
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
