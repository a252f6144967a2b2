"""The range worker of `facepipe decode`: one planned key range of a `.rec` → one Parquet shard.

`convert_range(task)` is a plain top-level function of a picklable dict, so a local process pool or a
Ray task can run it. It walks its range in row-group sized chunks of the memory-mapped file, parses them
with numpy (`decode_parse`), gathers the payloads into one Arrow buffer and writes the shard (temp file
+ rename, hashed while written). Writing is pipelined: a thread encodes and writes chunk n (Arrow
releases the GIL) while this thread parses chunk n+1. Memory per worker is a few chunks, whatever the
file size. The done-marker is written after the shard, so a killed worker leaves either both or a range
to redo.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from facepipe.data.decode_parse import ParsedChunk, check_labels, parse_chunk, validate_images
from facepipe.data.decode_resume import finished_marker, marker_path, shard_path, write_small_json
from facepipe.errors import DataError

__all__ = ["convert_range"]

_ONE_FILE = 1 << 62  # the range is one shard, and its chunks already have the row-group size


def convert_range(task: dict) -> dict:
    """Convert one planned range into `task['out_dir']/part-NNNNN.parquet`; returns its done-marker.

    `task` holds plain values and numpy arrays only (picklable for processes and Ray). A range whose
    done-marker matches the task's fingerprint and whose shard is present with the recorded size is
    skipped.
    """
    import pyarrow as pa

    from facepipe.data.shards import ShardWriter

    done = finished_marker(task)
    if done is not None:
        return {**done, "skipped": True}

    rejects: list[dict] = []
    stats = {"rows": 0, "label_min": None, "label_max": None, "image_bytes": 0}
    out = shard_path(task)
    with (
        _MappedSource(task["rec_path"]) as source,
        ShardWriter(
            out.parent, "part", target_bytes=_ONE_FILE, row_group_bytes=_ONE_FILE, start_index=task["index"]
        ) as writer,
        _WriteBehind(writer) as behind,
    ):
        for n, (lo, hi) in enumerate(_chunks(task["offsets"], task["ends"], task["row_group_bytes"])):
            table = _convert_chunk(task, source, lo, hi, rejects, stats, slot=n % _WriteBehind.SLOTS)
            source.release()
            if table is not None:
                behind.submit(table)
            del table  # its gather buffer is reused SLOTS chunks later, once this write is done
        behind.wait()
        # an all-rejected range still leaves a (valid, empty) shard, so resume sees it as done
        shard = writer.close(keep_empty=True)[0]
    # Arrow's pool keeps a chunk's worth of freed buffers for reuse within the range (refaulting them
    # every chunk costs more than the copy); give them back between ranges so memory stays flat.
    pa.default_memory_pool().release_unused()
    marker = {
        "index": task["index"],
        "fingerprint": task["fingerprint"],
        "dataset": task["dataset"],
        "shard": {
            "path": f"train/{out.name}",
            "rows": shard["rows"] if stats["rows"] else 0,
            "bytes": shard["bytes"],
            "sha256": shard["sha256"],
        },
        "key_min": int(task["keys"].min()),
        "key_max": int(task["keys"].max()),
        **stats,
        "rejects": rejects,
    }
    write_small_json(marker_path(task), marker)
    return {**marker, "skipped": False}


def _chunks(offsets: np.ndarray, ends: np.ndarray, chunk_bytes: int):
    """Split a range into runs whose byte span stays within `chunk_bytes` (one row group each)."""
    start = 0
    n = len(offsets)
    while start < n:
        stop = int(np.searchsorted(ends, offsets[start] + chunk_bytes, side="right"))
        stop = max(stop, start + 1)
        yield start, min(stop, n)
        start = stop


class _WriteBehind:
    """Runs `writer.write(table)` on one thread, in order, at most `DEPTH` writes in flight.

    Parquet encoding and the file write release the GIL, so they overlap with parsing and gathering the
    next chunk here. A gather buffer is free again `SLOTS` chunks later. (Deeper queues measured no
    faster on the shared 2-core machine and cost a 4 MB buffer each.) A failed write is raised by the
    next `submit`/`wait` (later queued writes are skipped); on the way out after an error the writes in
    flight are waited for (errors dropped) before the shard writer aborts the file.
    """

    DEPTH = 1
    SLOTS = DEPTH + 1

    def __init__(self, writer) -> None:
        self._writer = writer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: deque[Future] = deque()
        self._failed = False

    def _write(self, table) -> None:
        if self._failed:
            return
        try:
            self._writer.write(table)
        except BaseException:
            self._failed = True
            raise

    def submit(self, table) -> None:
        while len(self._pending) >= self.DEPTH:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._write, table))

    def wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> _WriteBehind:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
            else:
                self._failed = True  # queued writes are skipped
                for pending in self._pending:
                    with contextlib.suppress(BaseException):
                        pending.result()
        finally:
            self._pool.shutdown(wait=True)


class _MappedSource:
    """The source file mapped once per range, plus a gather buffer reused from chunk to chunk.

    Payloads are gathered straight from the mapping (one copy, page cache → Arrow buffer); after each
    chunk its pages are dropped from this process (MADV_DONTNEED), so resident memory is set by the
    row-group size, not by how much of the file has been converted.
    """

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(fd).st_size
            self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if self.size else None
        finally:
            os.close(fd)  # the mapping keeps the file open
        self.values = [np.zeros(0, np.uint8) for _ in range(_WriteBehind.SLOTS)]
        self._mapped: tuple[int, int] | None = None

    def read(self, offset: int, span: int) -> memoryview:
        if self.mm is None or span <= 0:
            return memoryview(b"")
        start = offset - offset % mmap.PAGESIZE
        self.mm.madvise(mmap.MADV_WILLNEED, start, offset + span - start)
        self._mapped = (start, offset + span - start)
        return memoryview(self.mm)[offset : offset + span]

    def release(self) -> None:
        if self._mapped is not None:
            self.mm.madvise(mmap.MADV_DONTNEED, *self._mapped)
            self._mapped = None

    def values_for(self, size: int, capacity: int, slot: int) -> np.ndarray:
        """Gather buffer `slot`, `size` bytes long; allocated once at the chunk capacity, since growing it
        chunk by chunk would leave the allocator's freed smaller blocks behind (RSS creeping with input
        size)."""
        if len(self.values[slot]) < size:
            self.values[slot] = np.empty(max(size, capacity), np.uint8)
        return self.values[slot][:size]

    def __enter__(self) -> _MappedSource:
        return self

    def __exit__(self, *exc) -> None:
        if self.mm is not None:
            # a view may still be alive after an error: then the GC closes the mapping
            with contextlib.suppress(BufferError):
                self.mm.close()


def _convert_chunk(
    task: dict, source: _MappedSource, lo: int, hi: int, rejects: list[dict], stats: dict, slot: int
):
    """Records lo..hi of the range (one contiguous stretch of the file) → a table of the training
    schema (its image bytes in gather buffer `slot`), or None when every record was rejected."""
    keys = task["keys"][lo:hi]
    offsets = task["offsets"][lo:hi]
    ends = np.minimum(task["ends"][lo:hi], source.size)
    base = int(offsets[0])
    span = max(int(ends.max()) - base, 0) if base < source.size else 0
    region = source.read(base, span)
    avail = np.maximum(ends - base, 0)
    parsed = parse_chunk(region, offsets, base, avail, source.size, keys, task["rec_path"])
    reasons = parsed.reasons
    check_labels(task, keys, parsed.labels, reasons)
    if task["validate"]:
        validate_images(lambda i: parsed.payload(i, region), len(keys), task["image_size"], reasons)

    if reasons:
        first = min(reasons, key=lambda i: int(offsets[i]))
        if not task["skip_bad"]:
            raise DataError(reasons[first], task["rec_path"], int(keys[first]))
        for i in sorted(reasons):
            rejects.append({"source": task["dataset"], "key": int(keys[i]), "reason": reasons[i]})
    keep = np.ones(len(keys), dtype=bool)
    keep[list(reasons)] = False
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        return None

    image, image_bytes = _gather_payloads(parsed, region, rows, source, task["row_group_bytes"], slot)
    labels = parsed.labels[rows].astype(np.int64) + task["label_offset"]
    _update_stats(stats, labels, image_bytes)
    return _training_table(task, keys[rows], labels, image, lo, hi, rows)


def _gather_payloads(
    parsed: ParsedChunk, region: memoryview, rows: np.ndarray, source: _MappedSource, capacity: int, slot: int
):
    """The kept payloads as one Arrow binary array (one copy into a reused buffer + an offsets array),
    and their total size."""
    import pyarrow as pa

    if parsed.slow:
        pieces = [np.frombuffer(parsed.payload(i, region), dtype=np.uint8) for i in rows.tolist()]
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    else:
        u8 = np.frombuffer(region, dtype=np.uint8)
        starts, stops = parsed.starts[rows], parsed.stops[rows]
        pieces = [u8[s:e] for s, e in zip(starts.tolist(), stops.tolist(), strict=True)]
        lengths = stops - starts
    value_offsets = np.zeros(len(rows) + 1, dtype=np.int32)  # a chunk is one row group: far below 2 GiB
    np.cumsum(lengths, out=value_offsets[1:])
    values = source.values_for(int(value_offsets[-1]), capacity, slot)
    np.concatenate(pieces, out=values)
    array = pa.Array.from_buffers(
        pa.binary(), len(rows), [None, pa.py_buffer(value_offsets), pa.py_buffer(values)]
    )
    return array, int(value_offsets[-1])


def _training_table(task: dict, keys, labels, image, lo: int, hi: int, rows: np.ndarray):
    import pyarrow as pa

    columns = {
        "key": _numeric_array(keys, pa.int64()),
        "label": _numeric_array(labels, pa.int64()),
        "image": image,
        "dataset": _repeated_string(task["dataset"], len(rows)),
    }
    degradation = task.get("degradation")
    if degradation is not None:
        deg = degradation[lo:hi][rows]
        columns["degradation"] = _numeric_array(deg, pa.float32(), null_mask=np.isnan(deg))
    return pa.table(columns)


def _update_stats(stats: dict, labels: np.ndarray, image_bytes: int) -> None:
    lo, hi = int(labels.min()), int(labels.max())
    stats["rows"] += len(labels)
    stats["label_min"] = lo if stats["label_min"] is None else min(stats["label_min"], lo)
    stats["label_max"] = hi if stats["label_max"] is None else max(stats["label_max"], hi)
    stats["image_bytes"] += int(image_bytes)


def _repeated_string(value: str, n: int):
    import pyarrow as pa

    data = value.encode()
    offsets = np.arange(n + 1, dtype=np.int32) * len(data)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data * n)])


def _numeric_array(values: np.ndarray, type_, null_mask: np.ndarray | None = None):
    """numpy → Arrow without pa.array(), whose type sniffing imports pandas (a second of start-up)."""
    import pyarrow as pa

    data = np.ascontiguousarray(values, dtype=np.float32 if type_ == pa.float32() else np.int64)
    validity = None
    if null_mask is not None and null_mask.any():
        validity = pa.py_buffer(np.packbits(~null_mask, bitorder="little"))
    return pa.Array.from_buffers(type_, len(data), [validity, pa.py_buffer(data)])
