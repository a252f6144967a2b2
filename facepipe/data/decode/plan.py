"""Planning for `facepipe decode`: cut each source's image records into shard-sized key ranges.

Records are sorted by `.idx` offset (physical order: each range reads one contiguous stretch of the
file) and cut into runs of about `target_bytes` on-disk bytes. The plan depends only on the index, the
file size and the settings, so the same input gives the same ranges and byte-identical shards, whatever
the number of workers. Each range becomes a task: a dict of plain values and numpy arrays (picklable for
a process pool or a Ray task) with a fingerprint that its done-marker must match on resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from facepipe.data.dataset import Dataset
from facepipe.data.decode.coverage import check_outside_images
from facepipe.data.decode.resume import DONE_DIR
from facepipe.data.decode.sidecars import load_key_degradation, lookup_degradation
from facepipe.data.formats.image_header import DEFAULT_MAX_PIXELS
from facepipe.data.formats.insightface import TrainingSet, open_training_set
from facepipe.data.formats.recordio import is_increasing
from facepipe.data.formats.recordio_index import record_ends
from facepipe.errors import DataError
from facepipe.fsutil import escape_name

__all__ = ["PLAN_VERSION", "Plan", "build_plan", "dataset_ids", "plan_ranges", "record_ends"]

PLAN_VERSION = 1
# where the output goes, and how the source is hashed, are not what the shard is
_NOT_FINGERPRINTED = ("fingerprint", "out_dir", "done_dir", "source_hash")


class Plan:
    """All range tasks of a run, plus per-source entries for the manifest and the opened training sets."""

    def __init__(self) -> None:
        self.tasks: list[dict] = []
        self.sources: list[dict] = []
        self.sets: list[TrainingSet] = []
        self.rejects: list[dict] = []  # records outside every range: not in the index (--skip-bad)


def plan_ranges(offsets: np.ndarray, ends: np.ndarray, target_bytes: int) -> list[tuple[int, int]]:
    """Cut records (already in physical order) into [start, stop) runs of about `target_bytes` bytes."""
    if len(offsets) == 0:
        return []
    sizes = np.maximum(ends - offsets, 0)
    before = np.cumsum(sizes) - sizes
    group = before // max(int(target_bytes), 1)
    cuts = np.flatnonzero(np.diff(group)) + 1
    bounds = [0, *cuts.tolist(), len(offsets)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def fingerprint(task: dict) -> str:
    """sha256 over everything that determines the shard's content."""
    digest = hashlib.sha256()
    for name in sorted(task):
        if name in _NOT_FINGERPRINTED:
            continue
        value = task[name]
        digest.update(name.encode())
        if isinstance(value, np.ndarray):
            digest.update(value.dtype.str.encode() + value.tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def dataset_ids(sources: Sequence[Path]) -> list[str]:
    """One unique short name per source (folder or file stem; `-2`, `-3`... on clashes)."""
    ids: list[str] = []
    for src in sources:
        # strict UTF-8 (Arrow strings, JSON) whatever the folder name's bytes; lossless (fsutil.escape_name)
        base = escape_name(src.stem if src.is_file() else src.name)
        name, n = base, 2
        while name in ids:
            name, n = f"{base}-{n}", n + 1
        ids.append(name)
    return ids


def _images_in_physical_order(ts: TrainingSet) -> tuple[np.ndarray, np.ndarray]:
    """Image keys and their `.rec` offsets, sorted by offset."""
    idx_keys, idx_offsets = ts.idx_keys, ts.idx_offsets
    if ts.layout == "header":
        by_key = slice(None) if is_increasing(idx_keys) else np.argsort(idx_keys, kind="stable")
        offsets = idx_offsets[by_key][np.searchsorted(idx_keys[by_key], ts.image_keys)]
        keys = ts.image_keys
    else:
        keys, offsets = idx_keys, idx_offsets
    if is_increasing(offsets):  # written in key order, as InsightFace's tools do
        return keys, offsets
    order = np.argsort(offsets, kind="stable")
    return keys[order], offsets[order]


def _identity_window(ts: TrainingSet, keys: np.ndarray) -> dict:
    """Only the identities whose key ranges overlap this range travel with the task."""
    if ts.identity_starts is None:
        return {"identity_starts": None, "identity_ends": None, "identity_base": 0}
    first = int(np.searchsorted(ts.identity_ends, keys.min(), side="right"))
    last = int(np.searchsorted(ts.identity_starts, keys.max(), side="right"))
    return {
        "identity_starts": ts.identity_starts[first:last],
        "identity_ends": ts.identity_ends[first:last],
        "identity_base": first,
    }


def build_plan(
    sources: list[Path], ids: list[str], out: Path, target_bytes: int, row_group_bytes: int,
    validate: bool, skip_bad: bool, max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Plan:  # fmt: skip
    """Open every source and cut it into tasks; source i's labels are offset by the classes before it."""
    plan = Plan()
    label_offset = 0
    for n, (src, dataset) in enumerate(zip(sources, ids, strict=True)):
        ts = open_training_set(src, skip_bad)
        plan.sets.append(ts)
        plan.rejects += check_outside_images(ts, skip_bad, dataset)
        if ts.num_classes is None and n < len(sources) - 1:
            raise DataError(
                "the number of classes is unknown (no property file, no identity records), so the labels "
                "of the following sources cannot be offset",
                str(ts.rec_path),
            )
        rec_stat = ts.rec_path.stat()
        keys, offsets = _images_in_physical_order(ts)
        ends = record_ends(ts.idx_offsets, rec_stat.st_size, offsets)
        sidecar = load_key_degradation(ts.rec_path)
        degradation = lookup_degradation(sidecar, keys) if sidecar is not None else None
        first_index = len(plan.tasks)
        for lo, hi in plan_ranges(offsets, ends, target_bytes):
            task = {
                "index": len(plan.tasks),
                "rec_path": str(ts.rec_path),
                "dataset": dataset,
                "label_offset": label_offset,
                "num_classes": ts.num_classes,
                "keys": keys[lo:hi],
                "offsets": offsets[lo:hi],
                "ends": ends[lo:hi],
                **_identity_window(ts, keys[lo:hi]),
                "degradation": degradation[lo:hi] if degradation is not None else None,
                "image_size": ts.image_size,
                "row_group_bytes": int(row_group_bytes),
                "validate": bool(validate),
                "max_pixels": int(max_pixels) if validate else None,
                "skip_bad": bool(skip_bad),
                "rec_size": rec_stat.st_size,
                "rec_mtime_ns": rec_stat.st_mtime_ns,  # a changed source is converted again
                "plan_version": PLAN_VERSION,
                "out_dir": str(Dataset(out).train_dir),
                "done_dir": str(out / DONE_DIR),
            }
            task["fingerprint"] = fingerprint(task)
            plan.tasks.append(task)
        plan.sources.append(
            {
                "dataset": dataset,
                "path": escape_name(str(src)),
                "layout": ts.layout,
                "label_convention": ts.label_convention,
                "label_offset": label_offset,
                "num_classes": ts.num_classes,
                "num_images_indexed": ts.num_images,
                "key_range": [int(keys.min()), int(keys.max())] if len(keys) else None,
                "shards": [first_index, len(plan.tasks)],
                "degradation_sidecar": sidecar["path"].name if sidecar else None,
                "files": {},
            }
        )
        if ts.num_classes is not None:
            label_offset += ts.num_classes
    return plan
