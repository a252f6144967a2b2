"""Kills leave nothing behind (issue 18, class 7), with real `facepipe decode` processes.

A `sitecustomize` on the subprocesses' path (test harness only) makes one chosen range wait in its
worker and say so in a file, so the test knows which worker holds which range when it kills it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.unit.test_decode import make_source

pytestmark = pytest.mark.slow  # real processes: several seconds on a busy 2-core machine

ROOT = Path(__file__).resolve().parents[2]

HARNESS = textwrap.dedent(
    """
    import os, time
    if os.environ.get("FACEPIPE_TEST_HOLD_TASK"):
        import facepipe.data.align.worker
        import facepipe.data.decode.worker

        def holding(module, name, index_of):
            original = getattr(module, name)

            def run(task):
                if index_of(task) == int(os.environ["FACEPIPE_TEST_HOLD_TASK"]):
                    folder = os.environ["FACEPIPE_TEST_HOLD_DIR"]
                    open(os.path.join(folder, f"holding-{os.getpid()}"), "w").close()
                    time.sleep(120)
                return original(task)

            run.__module__, run.__qualname__ = original.__module__, original.__qualname__  # pickled by name
            setattr(module, name, run)

        holding(facepipe.data.decode.worker, "convert_range", lambda task: task["index"])
        holding(facepipe.data.align.worker, "align_chunk", lambda task: task.index)
    """
)


def _start(tmp_path: Path, arguments: list, hold: int | None) -> subprocess.Popen:
    """`facepipe ARGUMENTS --workers 2` in a child process; task `hold` (a range or chunk) waits."""
    harness = tmp_path / "harness"
    harness.mkdir(exist_ok=True)
    (harness / "sitecustomize.py").write_text(HARNESS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(harness), str(ROOT)])}
    if hold is not None:
        env |= {"FACEPIPE_TEST_HOLD_TASK": str(hold), "FACEPIPE_TEST_HOLD_DIR": str(harness)}
    command = [sys.executable, "-m", "facepipe", *map(str, arguments), "--workers", "2"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _decode(tmp_path: Path, src: Path, out: Path, hold: int | None) -> subprocess.Popen:
    return _start(tmp_path, ["decode", src, out, "--target-mb", "0.02"], hold)


def _holder(tmp_path: Path, process: subprocess.Popen, timeout: float = 60) -> int:
    """The pid of the worker holding the chosen range, once it holds it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list((tmp_path / "harness").glob("holding-*"))
        if found:
            return int(found[0].name.split("-")[1])
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("no worker took the held range")


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "src", n_classes=8, per_class=10, pairs=0)  # several ranges


@pytest.mark.timeout(180)
def test_sigkill_of_decode_leaves_no_worker_or_resource_tracker(tmp_path, source):
    process = _decode(tmp_path, source, tmp_path / "out", hold=1)
    _holder(tmp_path, process)
    left = _descendants(process.pid)
    assert len(left) >= 3  # two pool workers and multiprocessing's resource_tracker
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(map(_alive, left)):
        time.sleep(0.1)
    assert not [pid for pid in left if _alive(pid)], "processes outlived the killed decode"


@pytest.mark.timeout(240)
def test_sigkill_of_a_worker_names_its_range_and_the_rerun_resumes(tmp_path, source):
    out = tmp_path / "out"
    process = _decode(tmp_path, source, out, hold=2)
    os.kill(_holder(tmp_path, process), signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "Traceback" not in err and "BrokenProcessPool" not in err
    (line,) = err.strip().splitlines()
    assert "a decode worker process died (killed, or out of memory) while converting range 2 (" in line
    assert "train.rec, keys " in line and "run the same command again to resume" in line

    again = _decode(tmp_path, source, out, hold=None)
    printed, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    reference = _decode(tmp_path, source, tmp_path / "reference", hold=None)
    assert reference.communicate(timeout=120) and reference.returncode == 0
    assert "shards already done" in printed and " 0 shards already done" not in printed
    shards = lambda folder: json.loads((folder / "manifest.json").read_text())["shards"]
    assert shards(out) == shards(tmp_path / "reference")


@pytest.mark.timeout(240)
def test_sigkill_of_an_align_worker_names_its_chunk_and_the_rerun_resumes(tmp_path):
    from tests.unit.test_align import _make_folder, _read

    src, marks = _make_folder(tmp_path, identities=("a", "b", "c"), per_identity=2, extra=False)
    arguments = lambda out: [
        "align",
        src,
        out,
        "--landmarks",
        marks,
        "--chunk-size",
        "1",
        "--no-contact-sheet",
    ]
    process = _start(tmp_path, arguments(tmp_path / "out"), hold=3)
    os.kill(_holder(tmp_path, process), signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "Traceback" not in err and "BrokenProcessPool" not in err
    assert "an align worker process died (killed, or out of memory) while aligning chunk(s) 3 (" in err
    assert "run the same command again to resume" in err
    again = _start(tmp_path, arguments(tmp_path / "out"), hold=None)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "resuming:" in err
    reference = _start(tmp_path, arguments(tmp_path / "reference"), hold=None)
    assert reference.communicate(timeout=120) and reference.returncode == 0
    assert _read(tmp_path / "out").equals(_read(tmp_path / "reference"))
