"""Which stages are done: a fingerprint of what a stage would run, and markers of finished runs.

A marker records the fingerprint of a stage's command, parameters and inputs once the stage succeeds;
a later run with the same fingerprint skips the stage as long as its outputs still exist, so a retried
or repeated flow never redoes finished work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from facepipe import storage
from facepipe.data.dataset import Dataset
from facepipe.errors import DataError
from facepipe.fsutil import write_json_atomic

__all__ = [
    "LOG_DIR",
    "STATE_DIR",
    "completed",
    "fingerprint",
    "marker_path",
    "path_state",
    "run_name",
    "stable_argv",
    "write_marker",
]

STATE_DIR = ".facepipe/stages"  # markers of completed stages, inside the flow's workdir
LOG_DIR = ".facepipe/logs"


def path_state(path: str | os.PathLike) -> Any:
    """A cheap, content-sensitive description of an input: DVC md5, dataset fingerprint, or file listing.

    Stage outputs carry a manifest (decode/align: its `Dataset.fingerprint`, from the shard hashes) or
    are DVC-tracked (the raw dataset), which pins their content without re-reading gigabytes; otherwise
    sizes and modification times stand in.
    """
    remote = storage.is_remote(path)  # object storage: decode/align outputs carry a manifest there too
    p = Path(path)
    dvc_file = p.with_name(p.name + ".dvc")
    if not remote and dvc_file.is_file():
        return {"dvc": hashlib.sha256(dvc_file.read_bytes()).hexdigest()}
    dataset = Dataset.at(path)
    if dataset.has_manifest():
        with contextlib.suppress(DataError):  # an unreadable manifest: what follows stands in
            return {"manifest": dataset.fingerprint}
    if remote:
        return {"remote": str(path), "exists": storage.exists(path)}
    if p.is_file():
        st = p.stat()
        return {"file": [st.st_size, st.st_mtime_ns]}
    if p.is_dir():
        listing = []
        for child in sorted(p.rglob("*")):
            if child.is_file():
                st = child.stat()
                listing.append([str(child.relative_to(p)), st.st_size, st.st_mtime_ns])
        return {"dir": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    return {"missing": str(p)}


def stable_argv(argv: list[str]) -> list[str]:
    """The command minus where it runs: a Ray address changes no result (and differs per cluster)."""
    return [a for a in argv if ".scaling.address=" not in a]


def fingerprint(argv: list[str], params: Any, deps: list[str], workdir: Path) -> str:
    state = {
        "argv": stable_argv(argv),
        "params": params,
        "deps": {d: path_state(_located(d, workdir)) for d in deps},
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def _located(path: str, workdir: Path) -> str | Path:
    """A stage's input or output: a URI as it is, a relative path inside the workdir."""
    if storage.is_remote(path) or Path(path).is_absolute():
        return path
    return workdir / path


def marker_path(workdir: Path, name: str) -> Path:
    return workdir / STATE_DIR / f"{name}.json"


def completed(workdir: Path, name: str, fp: str, outs: list[str]) -> dict[str, Any] | None:
    """The marker of an earlier successful run of this exact stage, if its outputs are still there."""
    marker = marker_path(workdir, name)
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != fp:
        return None
    if not all(storage.exists(_located(o, workdir)) for o in outs):
        return None
    return record


def write_marker(workdir: Path, name: str, record: dict[str, Any]) -> None:
    """Record a finished stage (atomically: a half-written marker would read as "not done")."""
    write_json_atomic(marker_path(workdir, name), record)


def run_name(prefix: str, params: Any, deps: list[str], workdir: str) -> str:
    """A training run name fixed by the stage's inputs: rerunning after a crash (a retry, or a new flow
    run with the same inputs) reuses it, and the training stage resumes from that run's checkpoint."""
    return f"{prefix}-{fingerprint([prefix], params, deps, Path(workdir))[:10]}"
