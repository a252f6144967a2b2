"""Resume: a `facepipe decode` killed with SIGKILL midway, run again, equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from facepipe.data.shards import list_shards, read_manifest
from tests.unit.test_decode import make_source, read_rows, shard_bytes

pytestmark = pytest.mark.slow  # three `facepipe decode` processes

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--target-mb", "0.004", "--workers", "1", "--validate"]


def _decode(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "facepipe", "decode", str(src), str(out), *ARGS],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_midway(src: Path, out: Path) -> int:
    """Start a decode, SIGKILL it once some (not all) ranges are done; returns how many were done."""
    proc = _decode(src, out)
    markers = out / ".decode"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if markers.is_dir() and len(list(markers.glob("part-*.json"))) >= 2:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the decode finished before it could be killed"
    return len(list(markers.glob("part-*.json")))


def test_killed_decode_resumes_to_identical_output(tmp_path):
    src = make_source(tmp_path / "src", n_classes=40, per_class=6, pairs=4)

    reference = tmp_path / "reference"
    done = subprocess.run(
        [sys.executable, "-m", "facepipe", "decode", str(src), str(reference), *ARGS],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    total = len(read_manifest(reference)["shards"])
    assert total >= 20

    out = tmp_path / "out"
    finished = _kill_midway(src, out)
    assert 0 < finished < total
    assert not (out / "manifest.json").exists()
    # Debris an interruption can leave: a temp file, and a shard renamed into place without its marker.
    (out / "train" / ".part-00099.parquet.abc.tmp").write_bytes(b"half")
    orphan = out / "train" / f"part-{total - 1:05d}.parquet"
    orphan.write_bytes(b"not really a shard")

    rerun = subprocess.run(
        [sys.executable, "-m", "facepipe", "decode", str(src), str(out), *ARGS],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert f"{finished} shards already done" in rerun.stdout

    assert shard_bytes(out) == shard_bytes(reference)  # byte-identical shards
    ours, theirs = read_manifest(out), read_manifest(reference)
    assert ours["shards"] == theirs["shards"] and ours["num_images"] == theirs["num_images"] == 240
    assert ours["pairs"].keys() == theirs["pairs"].keys()
    keys = read_rows(out)["key"].to_pylist()
    assert keys == list(range(1, 241))  # no duplicates, no gaps
    assert not list((out / "train").glob(".*.tmp"))
    assert all(pq.read_metadata(p).num_rows > 0 for p in list_shards(out))
