"""The range worker of `facepipe decode`: one planned key range of a `.rec` → one Parquet shard.

`convert_range(task)` is a plain top-level function of a picklable dict, so a local process pool or a
Ray task can run it. It walks its range in row-group sized chunks of the memory-mapped file, parses them
with numpy (`decode_parse`), points an Arrow binary-view array at the payloads where they lie, and
writes the shard (temp file + rename, hashed while written): the payload bytes are copied once, by the
Parquet writer. Writing is pipelined: a thread encodes and writes chunk n (Arrow releases the GIL)
while this thread parses chunk n+1. Memory per worker is a few chunks, whatever the file size. The
done-marker is written after the shard, so a killed worker leaves either both or a range to redo.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from facepipe.data.dataset import shard_relpath
from facepipe.data.decode.coverage import first_problem, gap_rejects
from facepipe.data.decode.hashing import new_hash, update_from_mapping
from facepipe.data.decode.parse import ParsedChunk, check_labels, parse_chunk, validate_images
from facepipe.data.decode.resume import finished_marker, marker_path, shard_path, write_small_json

__all__ = ["convert_range"]

_ONE_FILE = 1 << 62  # the range is one shard, and its chunks already have the row-group size


def convert_range(task: dict) -> dict:
    """Convert one planned range into `task['out_dir']/part-NNNNN.parquet`; returns its done-marker.

    `task` holds plain values and numpy arrays only (picklable for processes and Ray). A range whose
    done-marker matches the task's fingerprint and whose shard is present with the recorded size is
    skipped. With `task["source_hash"]` (an algorithm; set when the range is its whole source) the
    result's `source_digest` is that digest of the whole `.rec`, or None where it could not be taken.
    """
    import pyarrow as pa

    from facepipe.data.shard_writer import ShardWriter

    done = finished_marker(task)
    if done is not None:
        return {**done, "skipped": True}

    rejects: list[dict] = []
    unindexed: list[Exception] = []
    stats = {"rows": 0, "label_min": None, "label_max": None, "image_bytes": 0}
    out = shard_path(task)
    with (
        _MappedSource(task["rec_path"], task.get("source_hash")) as source,
        ShardWriter(
            out.parent, "part", target_bytes=_ONE_FILE, row_group_bytes=_ONE_FILE, start_index=task["index"]
        ) as writer,
        _WriteBehind(writer) as behind,
    ):
        behind.begin()
        for lo, hi in _chunks(task["offsets"], task["ends"], task["row_group_bytes"]):
            table, mapping = _convert_chunk(task, source, lo, hi, rejects, stats, unindexed)
            if table is None:
                source.release(mapping)
            else:  # the table points into the mapping: it is dropped once the table is written
                behind.submit(table, then=functools.partial(source.release, mapping))
            table = None
        if unindexed:
            raise unindexed[0]
        behind.wait()
        source_digest = source.source_digest()
        # an all-rejected range still leaves a (valid, empty) shard, so resume sees it as done
        shard = writer.close(keep_empty=True)[0]
    # Arrow's pool keeps freed buffers (the writer's pages) for reuse within the range; give them back
    # between ranges so memory stays flat.
    pa.default_memory_pool().release_unused()
    marker = {
        "index": task["index"],
        "fingerprint": task["fingerprint"],
        "dataset": task["dataset"],
        "shard": {
            "path": shard_relpath(out.name),
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
    return {**marker, "skipped": False, "source_digest": source_digest}


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

    Parquet encoding and the file write release the GIL, so they overlap with parsing the next chunk
    here. `submit(table, then)` runs `then()` on this thread once that table is written (or its write
    failed), e.g. to release the memory the table points into. A failed write is raised by the next
    `submit`/`wait` (later queued writes are skipped); on the way out after an error the writes in
    flight are waited for (errors dropped) before the shard writer aborts the file.

    One write in flight: two measured no faster overall on the shared 2-core machine (medians a little
    better, best runs a little worse), and the extra chunk's mapped pages lifted peak resident memory
    from +4% to +8% at 10x the input.
    """

    DEPTH = 1

    def __init__(self, writer) -> None:
        self._writer = writer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: deque[tuple[Future, Callable[[], None] | None]] = deque()
        self._failed = False

    def _run(self, step: Callable[[], None]) -> None:
        if self._failed:
            return
        try:
            step()
        except BaseException:
            self._failed = True
            raise

    def submit(self, table, then: Callable[[], None] | None = None) -> None:
        while len(self._pending) >= self.DEPTH:
            self._finish_oldest()
        step = functools.partial(self._writer.write, table)
        self._pending.append((self._pool.submit(self._run, step), then))

    def begin(self) -> None:
        """Open the shard on the writer thread now, while the first chunk is parsed here."""
        self._pending.append((self._pool.submit(self._run, self._writer.begin), None))

    def _finish_oldest(self) -> None:
        future, then = self._pending.popleft()
        try:
            future.result()
        finally:
            if then is not None:
                then()

    def wait(self) -> None:
        while self._pending:
            self._finish_oldest()

    def __enter__(self) -> _WriteBehind:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
            else:
                self._failed = True  # queued writes are skipped
                while self._pending:
                    with contextlib.suppress(BaseException):
                        self._finish_oldest()
        finally:
            self._pool.shutdown(wait=True)


class _MappedSource:
    """The source file mapped once per range; optionally hashed whole on the way.

    Each chunk's stretch is read through the mapping, and the tables built from it point into it; once
    a chunk's table is written its pages are dropped from this process (MADV_DONTNEED), so resident
    memory is set by the chunks in flight, not by how much of the file has been converted.

    With `hash_algorithm`, each chunk is hashed as it is read, together with any stretch between chunks
    (records of other kinds) and the rest of the file at the end: when the range is the whole source,
    this is the source's digest for the manifest, at a fraction of a separate pass over the file. A
    chunk that starts before the previous one ended (two index entries for one record) gives up:
    `source_digest` is then None and the file is hashed apart.
    """

    def __init__(self, path: str, hash_algorithm: str | None = None):
        self.path = path
        fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(fd).st_size
            self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if self.size else None
        finally:
            os.close(fd)  # the mapping keeps the file open
        self._digest = new_hash(hash_algorithm) if hash_algorithm else None
        self._hashed = 0  # the digest covers the file's bytes [0, _hashed)

    def read(self, offset: int, span: int) -> tuple[memoryview, tuple[int, int] | None]:
        """The file's bytes [offset, offset + span), and the (page-aligned) mapping to `release` after."""
        if self.mm is None or span <= 0:
            return memoryview(b""), None
        start = offset - offset % mmap.PAGESIZE
        mapping = (start, offset + span - start)
        self.mm.madvise(mmap.MADV_WILLNEED, *mapping)
        region = memoryview(self.mm)[offset : offset + span]
        if self._digest is not None:
            if offset < self._hashed:
                self._digest = None
            else:
                update_from_mapping(self._digest, self.mm, self._hashed, offset)
                self._digest.update(region)  # releases the GIL; the pages stay for the parse
                self._hashed = offset + span
        return region, mapping

    def release(self, mapping: tuple[int, int] | None) -> None:
        """Drop a chunk's pages from this process (the data stays in the page cache)."""
        if mapping is not None:
            self.mm.madvise(mmap.MADV_DONTNEED, *mapping)

    def source_digest(self) -> str | None:
        """Hex digest of the whole file, when hashing was asked for and every chunk came in file order."""
        if self._digest is None:
            return None
        if self.mm is not None:
            update_from_mapping(self._digest, self.mm, self._hashed, self.size)
        self._hashed = self.size
        return self._digest.hexdigest()

    def __enter__(self) -> _MappedSource:
        return self

    def __exit__(self, *exc) -> None:
        if self.mm is not None:
            # a view may still be alive after an error: then the GC closes the mapping
            with contextlib.suppress(BufferError):
                self.mm.close()


def _convert_chunk(
    task: dict, source: _MappedSource, lo: int, hi: int, rejects: list[dict], stats: dict, unindexed: list
):
    """Records lo..hi of the range (one contiguous stretch of the file) → a table of the training schema
    whose images point into the mapped stretch (or None when every record was rejected), and that
    mapping, to release once the table is written. Bad records stop the run here (without --skip-bad);
    bytes the index leaves out are put in `unindexed`, to stop it once the range's records are checked."""
    keys = task["keys"][lo:hi]
    offsets = task["offsets"][lo:hi]
    ends = np.minimum(task["ends"][lo:hi], source.size)
    base = int(offsets[0])
    span = max(int(ends.max()) - base, 0) if base < source.size else 0
    region, mapping = source.read(base, span)
    avail = np.maximum(ends - base, 0)
    parsed = parse_chunk(region, offsets, base, avail, source.size, keys, task["rec_path"])
    reasons = parsed.reasons
    check_labels(task, keys, parsed.labels, reasons)
    if task["validate"]:
        validate_images(
            lambda i: parsed.payload(i, region), len(keys), task["image_size"], reasons, task["max_pixels"]
        )

    if not task["skip_bad"]:
        problem = first_problem(reasons, parsed.gaps, keys, offsets, task["rec_path"], base)
        if reasons:
            raise problem
        if problem is not None:  # unindexed bytes: named after the range's bad records, if any
            unindexed.append(problem)
    for i in sorted(reasons):
        rejects.append(
            {"source": task["dataset"], "key": int(keys[i]), "reason": reasons[i], "offset": int(offsets[i])}
        )
    if parsed.gaps:
        rejects += gap_rejects(parsed.gaps, region, avail, task["rec_path"], base, task["dataset"])
    keep = np.ones(len(keys), dtype=bool)
    keep[list(reasons)] = False
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        return None, mapping

    image, image_bytes = _payload_views(parsed, region, rows)
    labels = parsed.labels[rows].astype(np.int64) + task["label_offset"]
    _update_stats(stats, labels, image_bytes)
    return _training_table(task, keys[rows], labels, image, lo, hi, rows), mapping


def _payload_views(parsed: ParsedChunk, region: memoryview, rows: np.ndarray):
    """The kept payloads as an Arrow binary-view array, and their total size.

    The views (16 bytes per value: length, first 4 bytes, buffer index, offset) point into the mapped
    region, or into one buffer of the reassembled multi-frame payloads, so no payload is copied here:
    the Parquet writer copies each one once, straight from the page cache into its page. (Gathering
    them into a contiguous binary array first cost a third of this thread's time and a pass over
    memory.)
    """
    import pyarrow as pa

    u8 = np.frombuffer(region, dtype=np.uint8)
    starts, lengths = parsed.starts[rows], parsed.stops[rows] - parsed.starts[rows]
    buffer_index = np.zeros(len(rows), dtype=np.int32)
    buffers = [u8]
    if parsed.slow:  # reassembled multi-frame payloads: one buffer of their own
        at = [row for row, i in enumerate(rows.tolist()) if i in parsed.slow]
        pieces = [parsed.slow[int(rows[row])] for row in at]
        sizes = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        starts, lengths = starts.copy(), lengths.copy()
        starts[at] = np.cumsum(sizes) - sizes
        lengths[at] = sizes
        buffer_index[at] = 1
        buffers.append(np.frombuffer(b"".join(pieces), dtype=np.uint8))
    views = binary_views(buffers, buffer_index, starts, lengths)
    array = pa.Array.from_buffers(
        pa.binary_view(), len(rows), [None, pa.py_buffer(views), *map(pa.py_buffer, buffers)]
    )
    return array, int(lengths.sum())


def binary_views(
    buffers: list[np.ndarray], buffer_index: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """Arrow binary-view structs for values `buffers[buffer_index[i]][starts[i]:starts[i] + lengths[i]]`.

    Each struct is 16 bytes: the int32 length, then, for a value longer than 12 bytes, its first 4 bytes,
    the buffer index and the offset; a shorter value sits inline in the last 12 bytes, zero-padded.
    """
    views = np.zeros((len(starts), 4), dtype="<i4")
    views[:, 0] = lengths
    views[:, 2] = buffer_index
    views[:, 3] = starts
    raw = views.view(np.uint8)  # (n, 16)
    lane = np.arange(12)
    for b, buffer in enumerate(buffers):
        mine = buffer_index == b
        long = np.flatnonzero(mine & (lengths > 12))
        raw[long, 4:8] = buffer[starts[long, None] + lane[:4]]
        short = np.flatnonzero(mine & (lengths <= 12))
        if len(short):
            inside = lane < lengths[short, None]
            picked = buffer[np.where(inside, starts[short, None] + lane, 0)] if len(buffer) else 0
            raw[short, 4:16] = np.where(inside, picked, 0)
    return views


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
