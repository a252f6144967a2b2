"""A local process pool whose workers never outlive the command, and which says what a dead worker held.

- A SIGKILLed command cannot clean up: each worker asks Linux for a parent-death signal
  (`prctl(PR_SET_PDEATHSIG, SIGKILL)`), so it dies with the process that started it; multiprocessing's
  `resource_tracker` then sees its pipe close and exits too.
- A worker killed on its own (by a user, the OOM killer) breaks the whole pool; each worker reports the
  task it starts, so the error can name the task that worker was running instead of a bare
  `BrokenProcessPool` traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ProcessPoolExecutor

__all__ = ["WatchedPool", "die_with_parent"]

_PR_SET_PDEATHSIG = 1
_started = None  # in a worker: the queue it reports each task's start on


def die_with_parent(parent_pid: int) -> None:
    """Have this process SIGKILLed when its parent dies (Linux); exit now if the parent already did."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _init(parent_pid: int, started, initializer: Callable[[], None] | None) -> None:
    global _started
    die_with_parent(parent_pid)
    _started = started
    if initializer is not None:
        initializer()


def _run(fn: Callable, label: Hashable, *args):
    _started.put((os.getpid(), label))
    return fn(*args)


class WatchedPool:
    """`ProcessPoolExecutor` (spawn) with `submit(fn, label, *args)`; after it breaks, `dead_labels()`."""

    def __init__(self, workers: int, initializer: Callable[[], None] | None = None):
        # spawn: the callers have threads (hashing, Arrow, OpenCV), and fork with threads is unsafe
        ctx = multiprocessing.get_context("spawn")
        self._started = ctx.SimpleQueue()
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=ctx,
            initializer=functools.partial(_init, os.getpid(), self._started, initializer),
        )
        self._processes: dict = {}

    def submit(self, fn: Callable, label: Hashable, *args) -> Future:
        future = self._pool.submit(_run, fn, label, *args)
        # the pool's own table of workers (private, but stable); kept to read exit codes after a break
        self._processes.update(getattr(self._pool, "_processes", None) or {})
        return future

    def dead_labels(self, unfinished: set) -> list:
        """Labels of the `unfinished` tasks whose worker died on its own (not stopped by the pool after
        the break); all the unfinished ones that had started when that cannot be told."""
        started: dict[int, Hashable] = {}
        while not self._started.empty():
            pid, label = self._started.get()
            started[pid] = label
        running = {pid: label for pid, label in started.items() if label in unfinished}
        codes = self._exit_codes(running)
        died = [label for pid, label in running.items() if codes.get(pid) not in (None, 0, -signal.SIGTERM)]
        return sorted(died or running.values())

    def _exit_codes(self, pids, timeout_s: float = 20.0) -> dict:
        """Exit codes of `pids` once settled. The pool's own thread reaps the same processes: when both
        call waitpid, the loser sees "no such child" and reads None for a moment, so poll, don't trust
        the first read (on a busy machine that moment is long enough to name no dead worker at all)."""
        deadline = time.monotonic() + timeout_s
        codes: dict = {}
        for pid in pids:
            process = self._processes.get(pid)
            if process is None:
                continue
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            while process.exitcode is None and time.monotonic() < deadline:
                time.sleep(0.02)
            codes[pid] = process.exitcode
        return codes

    def __enter__(self) -> WatchedPool:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
