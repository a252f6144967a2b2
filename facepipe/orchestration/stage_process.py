"""A stage is the `facepipe` CLI in a subprocess: every line to its log file, facepipe's own to the console.

The console (the Prefect run log, what `prefect deployment run --watch` and the demo show) gets what
`facepipe.console` keeps: facepipe's progress, per-epoch lines and summaries; everything else stays in
the stage's log file, whose path the stage prints when it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from facepipe.console import LineFilter, show_everything

__all__ = [
    "USER_ERROR_EXIT",
    "StageFailed",
    "facepipe_command",
    "run_logged",
]

USER_ERROR_EXIT = 2  # facepipe's exit code for FacepipeError/DataError


class StageFailed(RuntimeError):
    """A facepipe command exited non-zero; `permanent` when it reported a user error."""

    def __init__(self, name: str, returncode: int, tail: str, log_path: Path):
        self.returncode = returncode
        self.permanent = returncode == USER_ERROR_EXIT
        kind = "user error (not retried)" if self.permanent else "failure"
        super().__init__(f"stage {name}: {kind}, exit code {returncode}; log {log_path}\n{tail}")


def facepipe_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "facepipe", *argv]


def run_logged(
    name: str,
    argv: list[str],
    cwd: Path,
    log_path: Path,
    console: Callable[[str], None],
    env: dict[str, str] | None = None,
) -> list[str]:
    """Run `facepipe <argv>` in `cwd`, streaming: all output appended to `log_path`, the console's share
    to `console` as it comes. Returns the output's last lines; raises StageFailed on a non-zero exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=40)
    # progress bars redraw with carriage returns, which would become hundreds of log lines here
    quiet = {"PYTHONUNBUFFERED": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    child_env = {**os.environ, **quiet, **(env or {})}
    keep = LineFilter(everything=show_everything() or child_env.get("FACEPIPE_CONSOLE") == "all")
    with open(log_path, "a") as log_file:
        proc = subprocess.Popen(
            facepipe_command(argv),
            cwd=cwd,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:  # stream, so long stages show progress as they go
                log_file.write(line)
                tail.append(line.rstrip())
                shown = keep(line.rstrip())
                if shown is not None:
                    console(f"{name} | {shown}")
            returncode = proc.wait()
        finally:
            # cancelled, timed out or interrupted: the stage must not outlive its caller
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if returncode != 0:
        raise StageFailed(name, returncode, "\n".join(tail), log_path)
    return list(tail)
