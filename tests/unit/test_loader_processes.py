"""Process-mode loader: the thread mode's batches through shared memory, and nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from facepipe.data.loader import ShardLoader
from facepipe.data.loader_shared import SHM_DIR
from tests.unit.test_loader import write_shards

REPO = Path(__file__).resolve().parents[2]


def _epochs(loader: ShardLoader) -> list[tuple[bytes, bytes, int]]:
    out = []
    for epoch, start in ((0, 0), (1, 2), (2, 0)):  # a new shared block per epoch, and a resumed one
        for batch in loader.epoch(epoch, start_batch=start):
            out.append((batch.images.numpy().tobytes(), batch.labels.numpy().tobytes(), batch.index))
    return out


def test_same_batches_as_thread_mode_over_epochs(tmp_path):
    shards = write_shards(tmp_path)
    kwargs = {"batch_size": 10, "input_size": (16, 16), "seed": 4, "window_rows": 40, "prefetch": 2}
    with ShardLoader(shards, mode="thread", workers=2, **kwargs) as threads:
        expected = _epochs(threads)
    with ShardLoader(shards, mode="process", workers=2, **kwargs) as processes:
        assert _epochs(processes) == expected


def test_a_batch_kept_by_the_consumer_is_not_overwritten(tmp_path):
    shards = write_shards(tmp_path)
    with ShardLoader(shards, batch_size=10, input_size=(16, 16), mode="process", workers=1, prefetch=1) as a:
        kept = list(a.epoch(0))  # every batch held at once: slots were reused many times meanwhile
    with ShardLoader(shards, batch_size=10, input_size=(16, 16), mode="thread", workers=1) as b:
        for got, want in zip(kept, b.epoch(0), strict=True):
            assert np.array_equal(got.images.numpy(), want.images.numpy())


_CHILD = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import multiprocessing.shared_memory as sm
from facepipe.data.loader import ShardLoader
blocks = []
class Spy(sm.SharedMemory):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        blocks.append(self.name)
sm.SharedMemory = Spy
with ShardLoader(sys.argv[2:], batch_size=10, input_size=(16, 16), mode="process", workers=2) as loader:
    it = loader.epoch(0)
    next(it)
    pids = [p.pid for p in loader._pool._processes.values()]
    print(json.dumps({"pids": pids, "blocks": blocks}), flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return state.exists() and state.read_text().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /dev/shm: Linux")
def test_a_killed_training_process_leaves_no_decoder_and_no_shared_block(tmp_path):
    shards = write_shards(tmp_path)
    cmd = [sys.executable, "-c", _CHILD, str(REPO), *map(str, shards)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        info = json.loads(child.stdout.readline())
        assert info["pids"] and info["blocks"]
        assert all(Path(SHM_DIR, name).exists() for name in info["blocks"])
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            any(_alive(p) for p in info["pids"]) or any(Path(SHM_DIR, n).exists() for n in info["blocks"])
        ):
            time.sleep(0.2)
        assert not [p for p in info["pids"] if _alive(p)], "decode processes outlived the loader"
        assert not [n for n in info["blocks"] if Path(SHM_DIR, n).exists()], "shared block left in /dev/shm"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
