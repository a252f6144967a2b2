"""Training input pipeline: stream Parquet shards to one training worker, decoded in the background.

Why a sharded iterable rather than Ray Data: on this workload (small JPEGs, CPU-bound decode) Ray Data's
per-block scheduling cost more than the decoding itself (see bench/loader.py). The design here:

* The **plan** of an epoch is computed from Parquet metadata alone (`facepipe.data.loader_plan`): all
  rows of all shards are put in a seeded, epoch-dependent order, each rank takes a contiguous,
  equal-sized slice (disjoint parts, same step count on every rank, so DDP never waits on a rank that
  ran dry), rows are block-shuffled inside a window so a batch mixes many identities even though
  shards are written in label order, and the slice is cut into batches. Because the plan is pure
  arithmetic, resuming at batch k of an epoch costs nothing: batches 0..k-1 are not decoded again.
* Each batch is decoded by a pool sized to the cores the worker was given (threads by default:
  pyarrow reads and `cv2.imdecode` release the GIL, so threads scale without pickling pixels between
  processes; processes are available for decoders that hold the GIL). Decoders keep a small cache of
  row groups, so a row group is read once per window, not once per batch. Payloads are numpy views of
  the Arrow buffer, and each image goes from the JPEG decoder (RGB straight out of libjpeg-turbo) into
  its slot of the batch in one cv2 call, flipped on the way where the plan says so.
* Batches are **uint8 NHWC** (pinned memory when CUDA is present): a quarter of the bytes of float,
  and the normalisation `(x - 127.5) / 128` runs on the training device as the first operation of the
  step (`facepipe.models.preprocess.to_model_input`), where it is nearly free. The flip stays here: in
  the decoder it replaces the plain copy into the batch and costs nothing.
* A feeder thread keeps `prefetch` batches in flight, so the training thread only takes ready tensors
  from a queue.

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
from typing import Any

import numpy as np

from facepipe.data.loader_plan import Unit, batch_pieces, decode_workers, epoch_plan
from facepipe.errors import DataError, FacepipeError

__all__ = ["Unit", "Batch", "ShardLoader", "shard_units", "decode_rows", "normalise", "normalise_array"]

# InsightFace normalisation: (x - 127.5) / 128 maps bytes to about [-1, 1].
MEAN = 127.5
SCALE = 1.0 / 128.0


@dataclass
class Batch:
    """One decoded batch: uint8 NHWC images and int64 labels (torch tensors, pinned with CUDA)."""

    images: Any
    labels: Any
    index: int  # position of the batch inside its epoch


def shard_units(paths: Sequence[str | os.PathLike]) -> list[Unit]:
    """The row groups of `paths`, in path order, read from Parquet footers only."""
    import pyarrow.parquet as pq

    from facepipe.storage import is_remote, open_input_file, restore_uri

    units: list[Unit] = []
    for path in paths:
        path = restore_uri(str(path))  # a URI passed through Path() lost a slash of its "//"
        try:
            if is_remote(path):  # object storage: range reads of the footer only
                with open_input_file(path) as handle:
                    meta = pq.ParquetFile(handle).metadata
            else:
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

    from facepipe.storage import is_remote, open_input_file

    try:
        if is_remote(path):  # object storage: range reads of this row group's two column chunks
            with open_input_file(path) as handle:
                table = pq.ParquetFile(handle).read_row_group(row_group, columns=["image", "label"])
        else:
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
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the rows named by `pieces` ((shard, row group, row indices) in batch order).

    Returns uint8 NHWC images resized to `size` (height, width) in `color_order`, horizontally flipped
    where `flips` is true, and int64 labels. The images are written into `out` when given (e.g. a
    pinned batch buffer), else into one array allocated here. A row that does not decode raises
    `DataError` naming the shard and the row.
    """
    import cv2

    height, width = size
    total = sum(len(rows) for _, _, rows in pieces)
    shape = (total, height, width, 3)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise FacepipeError(f"batch buffer is {out.dtype} {out.shape}, decoding needs uint8 {shape}")
    labels = np.empty(total, dtype=np.int64)
    # libjpeg-turbo emits either order directly: no colour-conversion pass afterwards
    flag = cv2.IMREAD_COLOR_RGB if color_order == "RGB" else cv2.IMREAD_COLOR
    i = 0
    for path, rg, rows in pieces:
        column, label_values = _row_group(path, rg, cache_groups)
        rows = np.asarray(rows, dtype=np.int64)
        labels[i : i + len(rows)] = label_values[rows]
        for row in rows.tolist():
            raw = column[row]
            img = None if raw is None or not len(raw) else cv2.imdecode(raw, flag)
            if img is None:
                raise DataError("image does not decode", path=path, record=f"row group {rg}, row {row}")
            # one cv2 call (C loop, GIL released) puts the image into its slot of the batch
            dst = out[i]
            if img.shape[0] != height or img.shape[1] != width:
                cv2.resize(img, (width, height), dst=dst, interpolation=cv2.INTER_AREA)
                if flips[i]:
                    cv2.flip(dst, 1, dst=dst)
            elif flips[i]:
                cv2.flip(img, 1, dst=dst)
            else:
                dst[...] = img
            i += 1
    return out, labels


def normalise_array(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 (x - 127.5) / 128 of shape NCHW, laid out channels-last in memory.

    The host-side reference of `facepipe.models.preprocess.to_model_input` (which training and
    embedding use, on their device); both give the same bits, as every step is exact in float32.
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


def _pinned() -> bool:
    """Whether batches go to page-locked memory (only worth it, and only possible, with CUDA)."""
    import torch

    return torch.cuda.is_available()


def _tensor(array: np.ndarray, pin: bool) -> Any:
    import torch

    t = torch.from_numpy(array)
    return t.pin_memory() if pin else t


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


class ShardLoader:
    """Per-worker iterator over shuffled, decoded batches of a set of Parquet shards.

    `for batch in loader.epoch(e)` yields `Batch(images=uint8 NHWC tensor, labels=int64 tensor)`
    (normalise them on the training device with `facepipe.models.preprocess.to_model_input`);
    `loader.epoch(e, start_batch=k)` resumes an epoch at batch k with exactly the batches a fresh
    run would have produced from k on. `workers=None` sizes the decode pool to the cores this worker
    was given (Ray's assignment, else the affinity mask); a number is capped at those cores.
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
        workers: int | None = None,
        mode: str = "thread",
        prefetch: int = 4,
        window_rows: int = 8192,
        cache_groups: int | None = None,
    ):
        if not paths:
            raise FacepipeError("no training shards given")
        if not 0 <= rank < world_size:
            raise FacepipeError(f"rank {rank} outside world size {world_size}")
        if color_order not in ("RGB", "BGR"):
            raise FacepipeError(f"colour order must be RGB or BGR, not {color_order!r}")
        if mode not in ("thread", "process"):
            raise FacepipeError(f"loader mode must be 'thread' or 'process', not {mode!r}")
        self.units = shard_units([os.fspath(p) for p in paths])
        self.total_rows = sum(u.rows for u in self.units)
        self.batch_size = int(batch_size)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.color_order = color_order
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.flip = seed, shuffle, flip
        self.workers, self.mode = decode_workers(workers), mode
        self.prefetch = max(int(prefetch), 1)
        self.window_rows = max(int(window_rows), self.batch_size)
        if cache_groups is None:
            # every row group a window can touch: a window of W rows spans at most W/min_rows + 2 groups
            smallest = min(u.rows for u in self.units)
            cache_groups = min(len(self.units), self.window_rows // max(smallest, 1) + 2)
        self.cache_groups = int(cache_groups)
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

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit index, row, flip) per sample of this rank's epoch, in batch order.

        Depends only on (seed, epoch, rank, world size, shard metadata), so every rank and every
        restart computes the same plan.
        """
        lo = self.rank * self.rows_per_rank
        hi = lo + self.steps_per_epoch * self.batch_size  # drop the tail that makes no full batch
        return epoch_plan(self.units, self.seed, epoch, lo, hi, self.shuffle, self.window_rows, self.flip)

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
        import torch

        unit_idx, row_idx, flips = self.plan(epoch)
        pool = self._executor()
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        pin = _pinned()
        shape = (self.batch_size, *self.input_size, 3)

        def submit(b: int) -> tuple[Any, cf.Future]:
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            pieces, order = batch_pieces(self.units, unit_idx[sl], row_idx[sl])
            args = (pieces, flips[sl][order], self.input_size, self.color_order, self.cache_groups)
            if self.mode == "process":  # pixels come back pickled; pinned on arrival
                return None, pool.submit(decode_rows, *args)
            # threads decode straight into the batch's (pinned) tensor: no copy after decoding
            buffer = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
            return buffer, pool.submit(decode_rows, *args, buffer.numpy())

        def feed() -> None:
            try:
                pending: collections.deque[tuple[int, Any, cf.Future]] = collections.deque()
                nxt = start_batch
                while (nxt < self.steps_per_epoch or pending) and not stop.is_set():
                    while nxt < self.steps_per_epoch and len(pending) < self.prefetch:
                        pending.append((nxt, *submit(nxt)))
                        nxt += 1
                    b, buffer, fut = pending.popleft()
                    images, labels = fut.result()
                    batch = Batch(
                        buffer if buffer is not None else _tensor(images, pin), _tensor(labels, pin), b
                    )
                    while not stop.is_set():
                        try:
                            out.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                for _, _, fut in pending:
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
