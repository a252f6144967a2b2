"""What reaches a person's console: facepipe's own lines, not framework internals.

A training stage's output mixes facepipe's progress, per-epoch lines (rank 0) and summaries with Ray's
per-actor output (`(RayTrainWorker pid=…) Reporting training result …` from every rank, controller
chatter, tracebacks of retried internal calls), MLflow's and other libraries' INFO logs and Python
warnings. The console keeps facepipe's lines and anything logged at ERROR; the rest goes to a log file
(`FACEPIPE_CONSOLE=all`, or `-v` on the CLI, shows everything).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

__all__ = ["LineFilter", "for_console", "framework_output_to", "show_everything"]

# `(RayTrainWorker pid=123, ip=10.0.0.2) text`, possibly coloured: output Ray forwards from an actor
_RAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)*\([\w.:-]+ pid=\d+(?:, ip=[^)]*)?\)(?:\x1b\[[0-9;]*m)*\s?")
# `2026-12-06 06:25:23,159 INFO mlflow.store…` / `2026/12/06 06:25:23 INFO mlflow…`: a library's log line
_LIBRARY_LOG = re.compile(
    r"^\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d(?:[,.]\d+)? +(?:DEBUG|INFO|WARNING) +(?!facepipe)"
)
_WARNING = re.compile(r"^\S+\.py:\d+: \w*Warning: ")
_FACEPIPE_LINE = re.compile(r"^(?:\S+ \S+ \w+ )?facepipe\b")  # "facepipe …" or a facepipe logger's line


def show_everything() -> bool:
    return os.environ.get("FACEPIPE_CONSOLE") == "all"


class LineFilter:
    """Decides line by line what reaches the console; remembers whether the previous line was dropped,
    so a dropped warning's or traceback's indented continuation goes with it."""

    def __init__(self, everything: bool = False) -> None:
        self.everything = everything
        self.dropping = False

    def __call__(self, line: str) -> str | None:
        """The line to show (Ray's prefix removed from facepipe's own lines), or None."""
        if self.everything:
            return line
        if self.dropping and line[:1].isspace() and line.strip():
            return None
        self.dropping = False
        ray = _RAY_PREFIX.match(line)
        if ray:
            payload = line[ray.end() :]
            if _FACEPIPE_LINE.match(payload):  # e.g. rank 0's per-epoch line
                return payload
            self.dropping = True
            return None
        if _LIBRARY_LOG.match(line) or _WARNING.match(line):
            self.dropping = True
            return None
        return line


def for_console(lines: list[str], everything: bool = False) -> list[str]:
    """The lines of a stage's output the console shows (see the module's docstring)."""
    keep = LineFilter(everything)
    return [shown for shown in map(keep, lines) if shown is not None]


class _FilteredStream(io.TextIOBase):
    """A text stream that writes everything to `log` and the console's share to `console`."""

    def __init__(self, console: TextIO, log: TextIO, keep: LineFilter) -> None:
        self.console, self.keep = console, keep
        self.log: TextIO | None = log
        self.partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.log is None:  # after the block: whatever kept a reference to this stream writes through
            return self.console.write(text)
        self.log.write(text)
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            shown = self.keep(line)
            if shown is not None:
                self.console.write(shown + "\n")
        return len(text)

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()
        self.console.flush()

    def isatty(self) -> bool:
        # colorama asks at interpreter exit, when pytest's capture may have closed the console
        return not self.console.closed and self.console.isatty()

    def fileno(self) -> int:  # subprocesses started meanwhile write to the real console
        return self.console.fileno()


@contextlib.contextmanager
def framework_output_to(log_path: str | os.PathLike | None) -> Iterator[Path | None]:
    """While inside, what this process prints (Ray's forwarded worker output included) goes whole to
    `log_path` and filtered to the console. None, or `FACEPIPE_CONSOLE=all`: nothing changes."""
    if log_path is None or show_everything():
        yield None
        return
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log:
        keep = LineFilter()
        out, err = sys.stdout, sys.stderr
        streams = (_FilteredStream(out, log, keep), _FilteredStream(err, log, keep))
        sys.stdout, sys.stderr = streams
        try:
            yield path
        finally:
            for stream in streams:
                with contextlib.suppress(Exception):
                    if stream.partial:
                        stream.write("\n")
                    stream.flush()
                stream.log = None  # the log closes here; later writes go straight to the console
            sys.stdout, sys.stderr = out, err
