"""Training input pipeline: stream Parquet shards to one training worker, decoded in the background.

Why a sharded iterable rather than Ray Data: on this workload (small JPEGs, CPU-bound decode) Ray Data's
per-block scheduling cost more than the decoding itself (see bench/loader.py). The design here:

* The **plan** of an epoch is computed from Parquet metadata alone (row counts per row group): all
  rows of all shards are put in a seeded, epoch-dependent order, each rank takes a contiguous,
  equal-sized slice (disjoint parts, same step count on every rank, so DDP never waits on a rank that
  ran dry), rows are block-shuffled inside a window so a batch mixes many identities even though
  shards are written in label order, and the slice is cut into batches. Because the plan is pure
  arithmetic, resuming at batch k of an epoch costs nothing: batches 0..k-1 are not decoded again.
* Each batch is decoded by a pool (threads by default: pyarrow reads and `cv2.imdecode`/`cv2.resize`
  release the GIL, so threads scale without pickling pixels between processes; processes are
  available for decoders that hold the GIL). Decoders keep a small cache of row groups, so a row group
  is read once per window, not once per batch. Thread decoders keep the GIL-held work per image to a
  few calls: payloads are numpy views of the Arrow buffer, cv2 writes into the batch, and the batch is
  normalised in one pass (float NCHW laid out channels-last, as the backbones train).
* A feeder thread keeps `prefetch` batches in flight (normalising process-mode batches into float
  tensors), so the training thread only takes ready tensors from a queue.

Memory is bounded by `prefetch` decoded batches plus the encoded bytes of the row groups one shuffle
window spans (the decoders' cache is sized to hold them, so each row group is read once per window),
independent of dataset size.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.errors import DataError, FacepipeError

__all__ = ["Unit", "Batch", "ShardLoader", "shard_units", "decode_rows", "normalise", "normalise_array"]

# InsightFace normalisation: (x - 127.5) / 128 maps bytes to about [-1, 1].
MEAN = 127.5
SCALE = 1.0 / 128.0


@dataclass(frozen=True)
class Unit:
    """One row group of one shard: the smallest piece the loader reads."""

    path: str
    row_group: int
    rows: int


@dataclass
class Batch:
    """One decoded batch: images (uint8 NHWC, or a float NCHW tensor after normalisation) and labels.

    Float batches are channels-last in memory (NHWC strides), as `normalise_array` makes them.
    """

    images: Any
    labels: Any
    index: int  # position of the batch inside its epoch


def shard_units(paths: Sequence[str | os.PathLike]) -> list[Unit]:
    """The row groups of `paths`, in path order, read from Parquet footers only."""
    import pyarrow.parquet as pq

    units: list[Unit] = []
    for path in paths:
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad footer
            raise DataError(f"cannot read Parquet footer: {err}", path=str(path)) from err
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            if rows:
                units.append(Unit(str(path), rg, rows))
    return units


# ---------------------------------------------------------------------------------------------
# Decoding (runs in pool threads or processes; imports nothing heavy at module level)
# ---------------------------------------------------------------------------------------------

_CACHE_LOCK = threading.Lock()
_CACHE: collections.OrderedDict[tuple[str, int], tuple[Any, Any]] = collections.OrderedDict()


class _BinaryColumn:
    """A binary Arrow array read as numpy views: `column[i]` is row i's bytes (no copy) or None.

    Slicing the data buffer costs a fraction of a microsecond with the GIL held; `to_pylist` would copy
    every payload into a new Python object first, work that serialises the decoding threads.
    """

    def __init__(self, array: Any) -> None:
        import pyarrow as pa

        wide = pa.types.is_large_binary(array.type)
        dtype = np.int64 if wide else np.int32
        itemsize = np.dtype(dtype).itemsize
        bufs = array.buffers()
        self.offsets = np.frombuffer(
            bufs[1], dtype=dtype, count=len(array) + 1, offset=array.offset * itemsize
        )
        self.data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
        self.valid = None if array.null_count == 0 else array.is_valid().to_numpy(zero_copy_only=False)
        self._array = array  # keeps the buffers alive

    def __getitem__(self, row: int) -> np.ndarray | None:
        if self.valid is not None and not self.valid[row]:
            return None
        return self.data[self.offsets[row] : self.offsets[row + 1]]


def _row_group(path: str, row_group: int, cache_groups: int) -> tuple[Any, Any]:
    """(image column, label column) of one row group, through a small per-process LRU cache."""
    key = (path, row_group)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path).read_row_group(row_group, columns=["image", "label"])
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot read row group {row_group}: {err}", path=path) from err
    value = (_BinaryColumn(table.column("image").combine_chunks()), table.column("label").to_numpy())
    with _CACHE_LOCK:
        _CACHE[key] = value
        while len(_CACHE) > max(cache_groups, 1):
            _CACHE.popitem(last=False)
    return value


def decode_rows(
    pieces: Sequence[tuple[str, int, np.ndarray]],
    flips: np.ndarray,
    size: tuple[int, int],
    color_order: str,
    cache_groups: int = 4,
    as_float: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the rows named by `pieces` ((shard, row group, row indices) in batch order).

    Returns images resized to `size` (height, width) in `color_order`, horizontally flipped where
    `flips` is true, and int64 labels. Images are uint8 NHWC, or with `as_float` what `normalise_array`
    makes of them (in the decoding thread, GIL released). A row that does not decode raises `DataError`
    naming the shard and the row.
    """
    import cv2

    height, width = size
    total = sum(len(rows) for _, _, rows in pieces)
    images = np.empty((total, height, width, 3), dtype=np.uint8)
    labels = np.empty(total, dtype=np.int64)
    to_rgb = color_order == "RGB"  # cv2 decodes to BGR
    out = 0
    for path, rg, rows in pieces:
        column, label_values = _row_group(path, rg, cache_groups)
        rows = np.asarray(rows, dtype=np.int64)
        labels[out : out + len(rows)] = label_values[rows]
        for row in rows.tolist():
            raw = column[row]
            img = None if raw is None or not len(raw) else cv2.imdecode(raw, cv2.IMREAD_COLOR)
            if img is None:
                raise DataError("image does not decode", path=path, record=f"row group {rg}, row {row}")
            if img.shape[0] != height or img.shape[1] != width:
                img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
            # cv2 writes straight into the batch (C loops, GIL released) instead of strided numpy copies
            dst = images[out]
            if to_rgb:
                cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=dst)
                if flips[out]:
                    cv2.flip(dst, 1, dst=dst)
            elif flips[out]:
                cv2.flip(img, 1, dst=dst)
            else:
                dst[...] = img
            out += 1
    return (normalise_array(images) if as_float else images), labels


def normalise_array(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 (x - 127.5) / 128 of shape NCHW, laid out channels-last in memory.

    One pass over contiguous memory (a channels-first copy costs as much as the JPEG decode), and a
    channels-last model takes the result without another copy.
    """
    # cast first, then float32 arithmetic: a ufunc fed uint8 with a float64 scalar takes numpy's slow
    # buffered casting loop (about 3x the time); both ways give the same bits, as 1/128 is exact
    out = np.empty(images.shape, dtype=np.float32)
    out[...] = images
    np.subtract(out, np.float32(MEAN), out=out)
    np.multiply(out, np.float32(SCALE), out=out)
    return out.transpose(0, 3, 1, 2)


def normalise(images: np.ndarray) -> Any:
    """uint8 NHWC -> the torch tensor of `normalise_array` (NCHW shape, channels-last memory)."""
    import torch

    return torch.from_numpy(normalise_array(images))


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


class ShardLoader:
    """Per-worker iterator over shuffled, decoded, normalised batches of a set of Parquet shards.

    `for batch in loader.epoch(e)` yields `Batch(images=float NCHW tensor, labels=int64 tensor)`;
    `loader.epoch(e, start_batch=k)` resumes an epoch at batch k with exactly the batches a fresh
    run would have produced from k on.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int,
        input_size: tuple[int, int] = (112, 112),
        color_order: str = "RGB",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        flip: bool = True,
        workers: int = 2,
        mode: str = "thread",
        prefetch: int = 4,
        window_rows: int = 8192,
        cache_groups: int | None = None,
        normalise_output: bool = True,
    ):
        if not paths:
            raise FacepipeError("no training shards given")
        if not 0 <= rank < world_size:
            raise FacepipeError(f"rank {rank} outside world size {world_size}")
        if color_order not in ("RGB", "BGR"):
            raise FacepipeError(f"colour order must be RGB or BGR, not {color_order!r}")
        if mode not in ("thread", "process"):
            raise FacepipeError(f"loader mode must be 'thread' or 'process', not {mode!r}")
        self.units = shard_units([str(Path(p)) for p in paths])
        self.total_rows = sum(u.rows for u in self.units)
        self.batch_size = int(batch_size)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.color_order = color_order
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.flip = seed, shuffle, flip
        self.workers, self.mode = max(int(workers), 1), mode
        self.prefetch = max(int(prefetch), 1)
        self.window_rows = max(int(window_rows), self.batch_size)
        if cache_groups is None:
            # every row group a window can touch: a window of W rows spans at most W/min_rows + 2 groups
            smallest = min(u.rows for u in self.units)
            cache_groups = min(len(self.units), self.window_rows // max(smallest, 1) + 2)
        self.cache_groups = int(cache_groups)
        self.normalise_output = normalise_output
        self.rows_per_rank = self.total_rows // world_size
        self.steps_per_epoch = self.rows_per_rank // self.batch_size
        if self.steps_per_epoch == 0:
            raise FacepipeError(
                f"{self.total_rows} training rows give no full batch of {self.batch_size} "
                f"on each of {world_size} workers; lower the batch size"
            )
        self._pool: cf.Executor | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    # -- planning -----------------------------------------------------------------------------

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit index, row, flip) per sample of this rank's epoch, in batch order.

        Depends only on (seed, epoch, rank, world size, shard metadata), so every rank and every
        restart computes the same plan.
        """
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.units)) if self.shuffle else np.arange(len(self.units))
        sizes = np.array([self.units[i].rows for i in order], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        lo = self.rank * self.rows_per_rank
        hi = lo + self.steps_per_epoch * self.batch_size  # drop the tail that makes no full batch
        unit_ids, rows = [], []
        first = int(np.searchsorted(starts, lo, side="right") - 1)
        for k in range(first, len(order)):
            a, b = starts[k], starts[k + 1]
            if a >= hi:
                break
            # each unit's rows in a unit-specific random order, then the part inside [lo, hi)
            # (seeded by the unit, so ranks sharing a unit agree on its order and split it exactly)
            if self.shuffle:
                unit_rows = np.random.default_rng([self.seed, epoch, int(order[k])]).permutation(
                    int(sizes[k])
                )
            else:
                unit_rows = np.arange(int(sizes[k]))
            take = unit_rows[max(lo - a, 0) : min(hi, b) - a]
            unit_ids.append(np.full(len(take), order[k], dtype=np.int64))
            rows.append(take)
        unit_idx = np.concatenate(unit_ids)
        row_idx = np.concatenate(rows)
        if self.shuffle:
            # block shuffle: mix rows across the units that share a window (shards are label-sorted)
            perm = np.arange(len(unit_idx))
            for start in range(0, len(perm), self.window_rows):
                block = perm[start : start + self.window_rows]
                perm[start : start + self.window_rows] = rng.permutation(block)
            unit_idx, row_idx = unit_idx[perm], row_idx[perm]
        flips = rng.random(len(unit_idx)) < 0.5 if self.flip else np.zeros(len(unit_idx), dtype=bool)
        return unit_idx, row_idx, flips

    def _batch_pieces(
        self, unit_idx: np.ndarray, row_idx: np.ndarray
    ) -> tuple[list[tuple[str, int, np.ndarray]], np.ndarray]:
        """Group a batch's rows into per-row-group pieces, keeping the batch order within pieces."""
        pieces = []
        # stable sort by unit so rows of one row group are read together; order then follows units
        order = np.argsort(unit_idx, kind="stable")
        u_sorted, r_sorted = unit_idx[order], row_idx[order]
        bounds = np.flatnonzero(np.diff(u_sorted)) + 1
        for us, rs in zip(np.split(u_sorted, bounds), np.split(r_sorted, bounds), strict=True):
            unit = self.units[int(us[0])]
            pieces.append((unit.path, unit.row_group, rs))
        return pieces, order

    # -- iteration ----------------------------------------------------------------------------

    def _executor(self) -> cf.Executor:
        if self._pool is None:
            if self.mode == "thread":
                self._pool = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="facepipe-decode")
            else:
                # spawn: the training process holds torch/gloo threads that must not be forked
                self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches `start_batch..steps_per_epoch-1` of `epoch`, prefetched in the background."""
        unit_idx, row_idx, flips = self.plan(epoch)
        pool = self._executor()
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def submit(b: int) -> cf.Future:
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            pieces, order = self._batch_pieces(unit_idx[sl], row_idx[sl])
            return pool.submit(
                decode_rows,
                pieces,
                flips[sl][order],
                self.input_size,
                self.color_order,
                self.cache_groups,
                float_in_decoder,
            )

        # threads normalise in the decoder (GIL released); processes ship uint8 (4x less to pickle)
        float_in_decoder = self.normalise_output and self.mode == "thread"

        def feed() -> None:
            try:
                pending: collections.deque[tuple[int, cf.Future]] = collections.deque()
                nxt = start_batch
                while (nxt < self.steps_per_epoch or pending) and not stop.is_set():
                    while nxt < self.steps_per_epoch and len(pending) < self.prefetch:
                        pending.append((nxt, submit(nxt)))
                        nxt += 1
                    b, fut = pending.popleft()
                    images, labels = fut.result()
                    if self.normalise_output:
                        import torch

                        images = torch.from_numpy(images) if float_in_decoder else normalise(images)
                        labels = torch.from_numpy(labels)
                    while not stop.is_set():
                        try:
                            out.put(Batch(images, labels, b), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                for _, fut in pending:
                    fut.cancel()
                out.put(None)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
                out.put(err)

        feeder = threading.Thread(target=feed, name="facepipe-feeder", daemon=True)
        feeder.start()
        try:
            while True:
                item = out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while feeder.is_alive():  # drain so a feeder blocked on a full queue sees `stop`
                with contextlib.suppress(queue.Empty):
                    out.get(timeout=0.1)
            feeder.join()
