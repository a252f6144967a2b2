"""Messages from training workers to the driver: events (start, step, checkpoint) and non-finite records.

On a cluster the workers run on other machines, whose disks the driver cannot read, so nothing a
worker says to the driver goes through a local path: workers put their messages into a Ray queue
whose actor lives on the driver's node, and a driver thread appends the events to the `--events`
file as they arrive (a `ray://` client's driver included). A queue survives the restart of a worker
group, so the events of a failed attempt are kept.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from facepipe.errors import NonFiniteLossError

POLL_S = 0.2


class EventLog:
    """The worker side: `write(**event)` sends one event (and `nonfinite` one record) to the driver.

    `sink` is a queue handle from `Mailbox.handle`, a local file path (one process, no cluster: one
    `write` per line with O_APPEND, so concurrent writers never interleave), or None (nothing sent).
    `keep_events` False: only non-finite records travel (no round trip per step when no one reads
    the events).
    """

    def __init__(self, sink: Any, keep_events: bool = True):
        self.sink, self.keep_events = sink, keep_events

    def write(self, **event: Any) -> None:
        # worker starts always travel (one per worker and attempt): the driver says where training runs
        if self.keep_events or event.get("event") == "start":
            self._send("event", event)

    def nonfinite(self, rank: int, step: int, message: str) -> None:
        self._send("nonfinite", {"rank": rank, "step": step, "message": message})
        self.write(event="nonfinite", rank=rank, step=step + 1, message=message)

    def _send(self, kind: str, body: dict[str, Any]) -> None:
        if self.sink is None:
            return
        if isinstance(self.sink, str | os.PathLike):
            if kind == "event":
                append_line(self.sink, body)
            return
        self.sink.put((kind, body))


def append_line(path: str | os.PathLike, event: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    finally:
        os.close(fd)


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    text = Path(path).read_text() if Path(path).exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Mailbox:
    """The driver side, inside a Ray session: `handle` goes into the loop config; on exit the last
    messages are drained and the thread stops. `raise_nonfinite()` raises what a worker recorded."""

    def __init__(self, events_path: str | os.PathLike | None):
        self.events_path = os.fspath(events_path) if events_path else None
        self.nonfinite: list[dict[str, Any]] = []
        self._starts: dict[int, dict[str, Any]] = {}  # rank -> start event of the attempt under way
        self.attempts = 0
        self._stop = threading.Event()
        self._queue: Any = None
        self._thread: threading.Thread | None = None

    @property
    def handle(self) -> Any:
        return self._queue

    def __enter__(self) -> Mailbox:
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # zero CPUs: the queue must not take a slot a training worker needs; pinned to this node,
        # so losing a worker node never loses the messages
        here = ray.get_runtime_context().get_node_id()
        strategy = NodeAffinitySchedulingStrategy(node_id=here, soft=False)
        self._queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": strategy})
        self._thread = threading.Thread(target=self._pump, name="facepipe-mailbox", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._drain()
        self._queue.shutdown()

    def _pump(self) -> None:
        while not self._stop.wait(POLL_S):
            self._drain()

    def _drain(self) -> None:
        waiting = self._queue.size()
        for kind, body in self._queue.get_nowait_batch(waiting) if waiting else []:
            if kind == "nonfinite":
                self.nonfinite.append(body)
                continue
            if body.get("event") == "start":
                self._note_start(body)
            if self.events_path:
                append_line(self.events_path, body)

    def _note_start(self, event: dict[str, Any]) -> None:
        """Once every worker of an attempt has started: one console line saying how many workers run
        on how many nodes and from which step (a restart after a lost node or worker shows here)."""
        if event["rank"] in self._starts:  # a new attempt before the last one had fully started
            self._starts.clear()
        self._starts[event["rank"]] = event
        if len(self._starts) < event["world"]:
            return
        self.attempts += 1
        nodes = len({e["node"] for e in self._starts.values()})
        step = event["step"]
        where = f"resuming from the checkpoint at step {step}" if step else "from step 0"
        workers = f"{event['world']} worker{'s' * (event['world'] > 1)} on {nodes} node{'s' * (nodes > 1)}"
        sys.stdout.write(f"facepipe train: attempt {self.attempts}: {workers}, {where}\n")
        sys.stdout.flush()
        self._starts.clear()

    def raise_nonfinite(self) -> None:
        """Raise the non-finite-loss error a worker recorded (lowest rank first), if any."""
        if self.nonfinite:
            raise NonFiniteLossError(min(self.nonfinite, key=lambda r: r["rank"])["message"])
