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

from facepipe.data.dataset import SHARD_PREFIX, Dataset
from facepipe.data.decode.hashing import DEFAULT_SOURCE_HASH, check_source_hash, hash_mapped
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
    return f"{SHARD_PREFIX}-{index:05d}"


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
    for directory, suffix in ((Path(Dataset(out).train_dir), ".parquet"), (out / DONE_DIR, ".json")):
        for path in directory.glob(f"{SHARD_PREFIX}-*{suffix}"):
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

    Files in `handed_over` are read whole by the conversion anyway (a source converted as one range),
    which hashes them on the way; this thread only looks them up in the cache, and `wait` takes the
    conversion's digests for the rest (hashing here any it did not deliver, e.g. a range skipped on
    resume).
    """

    def __init__(
        self,
        files: list[Path],
        done_dir: Path,
        algorithm: str = DEFAULT_SOURCE_HASH,
        handed_over: set[str] | frozenset[str] = frozenset(),
    ):
        super().__init__(daemon=True)
        self.files = files
        self.algorithm = check_source_hash(algorithm)  # fails here, in the caller, not in the thread
        self.cache_path = done_dir / SOURCE_HASH_CACHE
        self.handed_over = set(handed_over)
        self.result: dict[str, dict] = {}
        self.cache_hits = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._cache: dict = {}
        self._stats: dict[str, dict] = {}  # taken before hashing: a file changed meanwhile is hashed again

    def _load_cache(self) -> dict:
        cache = read_json_or_none(self.cache_path)
        if not isinstance(cache, dict) or cache.get("version") != _CACHE_VERSION:
            return {"version": _CACHE_VERSION}  # none yet, or another layout: hash everything again
        return cache

    def _remember(self, path: Path, digest: str) -> None:
        """Cache `digest` under the file's stat from before it was hashed, and write the cache out (per
        file: a killed run keeps what it hashed)."""
        entry = {**self._stats[str(path)], "digest": digest}
        self._cache[self.algorithm][str(path)] = entry
        write_small_json(self.cache_path, self._cache)
        self.result[str(path)] = {"size": entry["size"], self.algorithm: digest}

    def run(self) -> None:
        try:
            self._cache = self._load_cache()
            if not isinstance(self._cache.get(self.algorithm), dict):
                self._cache[self.algorithm] = {}
            known = self._cache[self.algorithm]
            self._stats = {str(path): _stat_key(path.stat()) for path in self.files}
            for path in self.files:
                entry = known.get(str(path))
                if _still_valid(entry, self._stats[str(path)]):
                    self.cache_hits += 1
                    self.result[str(path)] = {"size": entry["size"], self.algorithm: entry["digest"]}
                elif str(path) not in self.handed_over:
                    digest = hash_mapped(path, self.algorithm, self.stop)
                    if digest is None:
                        return
                    self._remember(path, digest)
        except BaseException as err:  # noqa: BLE001 - re-raised by the main thread
            self.error = err

    def wait(self, delivered: dict[str, str | None] | None = None) -> dict[str, dict]:
        """Join and return the hashes in file order (re-raising the thread's error). `delivered` holds
        the conversion's digests of handed-over files (None where it could not take one)."""
        self.join()
        if self.error is not None:
            raise self.error
        delivered = delivered or {}
        for path in self.files:
            if str(path) not in self.result:
                digest = delivered.get(str(path)) or hash_mapped(path, self.algorithm)
                self._remember(path, digest)
        return {str(path): self.result[str(path)] for path in self.files}
