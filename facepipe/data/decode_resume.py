"""Resume bookkeeping for `facepipe decode`: done-markers, stale outputs, cached source hashes.

A range is done when its shard was renamed into place *and* its marker (JSON with the shard's size and
sha256 and the task's fingerprint) was written after it. A rerun skips exactly those ranges; a range
without a matching marker is converted again from scratch, so nothing is duplicated or missing.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from facepipe.data.decode_hashing import DEFAULT_SOURCE_HASH, check_source_hash, hash_mapped
from facepipe.fsutil import atomic_path

__all__ = [
    "DONE_DIR",
    "SourceHasher",
    "finished_marker",
    "marker_path",
    "read_json_or_none",
    "remove_outside_plan",
    "shard_path",
    "write_small_json",
]

DONE_DIR = ".decode"  # done-markers and cached source hashes, inside OUT
SOURCE_HASH_CACHE = "source_hashes.json"
_CACHE_VERSION = 2  # {"version", <algorithm>: {path: entry}}; version 1 held sha256 entries by path


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def shard_path(task: dict) -> Path:
    return Path(task["out_dir"]) / f"{shard_name(task['index'])}.parquet"


def marker_path(task: dict) -> Path:
    return Path(task["done_dir"]) / f"{shard_name(task['index'])}.json"


def write_small_json(path: Path, obj: dict) -> None:
    """Atomic (temp + rename) but not fsync'd: a marker or cache lost in a power cut only means the
    work is redone; the shard it vouches for was fsync'd before its rename."""
    with atomic_path(path, fsync=False) as tmp:
        tmp.write_text(json.dumps(obj))


def read_json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def finished_marker(task: dict) -> dict | None:
    """The task's done-marker if its range is complete: same fingerprint, shard present at its size."""
    done = read_json_or_none(marker_path(task))
    if done is None or done.get("fingerprint") != task["fingerprint"]:
        return None
    shard = shard_path(task)
    if not shard.is_file() or shard.stat().st_size != done["shard"]["bytes"]:
        return None
    return done


def remove_outside_plan(out: Path, count: int) -> None:
    """Drop shards and markers a previous run with other settings left beyond this plan."""
    for directory, pattern in ((out / "train", "part-*.parquet"), (out / DONE_DIR, "part-*.json")):
        for path in directory.glob(pattern):
            try:
                index = int(path.name.split("-")[1].split(".")[0])
            except ValueError:
                continue
            if index >= count:
                path.unlink()


def _stat_key(stat: os.stat_result) -> dict:
    # A file replaced in place (same size, new inode) or rewritten (new mtime) is hashed again.
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _still_valid(entry, key: dict) -> bool:
    """A cached digest holds while the file's size, mtime and inode are those it was taken at."""
    return (
        isinstance(entry, dict)
        and bool(entry.get("digest"))
        and all(entry.get(k) == v for k, v in key.items())
    )


class SourceHasher(threading.Thread):
    """Hashes source files in the background while the ranges convert (file reads and the hash release
    the GIL); cached by (size, mtime, inode) in OUT/.decode so a resumed run doesn't hash twice.

    The cache holds one section per algorithm, so a run with another `algorithm` never takes an entry
    made by a different one. `result` maps each path to {"size", <algorithm>: hex digest};
    `cache_hits` counts the files whose hash came from the cache; `stop` ends it early when the
    conversion failed.
    """

    def __init__(self, files: list[Path], done_dir: Path, algorithm: str = DEFAULT_SOURCE_HASH):
        super().__init__(daemon=True)
        self.files = files
        self.algorithm = check_source_hash(algorithm)  # fails here, in the caller, not in the thread
        self.cache_path = done_dir / SOURCE_HASH_CACHE
        self.result: dict[str, dict] = {}
        self.cache_hits = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def _load_cache(self) -> dict:
        cache = read_json_or_none(self.cache_path)
        if not isinstance(cache, dict) or cache.get("version") != _CACHE_VERSION:
            return {"version": _CACHE_VERSION}  # none yet, or another layout: hash everything again
        return cache

    def run(self) -> None:
        try:
            cache = self._load_cache()
            if not isinstance(cache.get(self.algorithm), dict):
                cache[self.algorithm] = {}
            known = cache[self.algorithm]
            for path in self.files:
                key = _stat_key(path.stat())
                entry = known.get(str(path))
                if _still_valid(entry, key):
                    self.cache_hits += 1
                else:
                    digest = hash_mapped(path, self.algorithm, self.stop)
                    if digest is None:
                        return
                    entry = {**key, "digest": digest}
                    known[str(path)] = entry
                    write_small_json(self.cache_path, cache)  # per file: a killed run keeps what it hashed
                self.result[str(path)] = {"size": entry["size"], self.algorithm: entry["digest"]}
        except BaseException as err:  # noqa: BLE001 - re-raised by the main thread
            self.error = err

    def wait(self) -> dict[str, dict]:
        """Join and return the hashes (re-raising the thread's error)."""
        self.join()
        if self.error is not None:
            raise self.error
        return self.result
