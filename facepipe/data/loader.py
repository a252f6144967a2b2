"""Training input pipeline: stream Parquet shards to one training worker, decoded in the background.

Why a sharded iterable rather than Ray Data: on this workload (small JPEGs, CPU-bound decode) Ray Data's
per-block scheduling cost more than the decoding itself (see bench/loader.py). The design here:

* The **plan** of an epoch is computed from Parquet metadata alone (`facepipe.data.loader_plan`): all
  rows of all shards are put in a seeded, epoch-dependent order, each rank takes a contiguous,
  equal-sized slice (disjoint parts, same step count on every rank, so DDP never waits on a rank that
  ran dry), rows are block-shuffled inside a window so a batch mixes many identities even though
  shards are written in label order, and the slice is cut into batches. Because the plan is pure
  arithmetic, resuming at batch k of an epoch costs nothing: batches 0..k-1 are not decoded again.
* A reader thread (`facepipe.data.loader_read.ReadAhead`) fetches the row groups in the order the
  plan first needs them, about two windows ahead of the decoders, and drops each after its last batch:
  each group is read once per epoch, memory stays bounded, and object-storage latency overlaps the
  decoding. Payloads are numpy views of the Arrow buffer (no Python object per image). The next
  epoch's reader starts while an epoch's last batches decode, so epochs do not wait for it.
* Each batch is one task of a pool sized to the cores the worker was given (`loader_decode`). A task
  decodes its batch into the batch's preallocated memory, flipped in place where the plan says so
  (`facepipe.data.formats.decode_into.decode_many`: a C extension decodes the batch's plain JPEGs
  straight into their slots with the GIL released once; the rest go image by image).
  - `mode="thread"` (default): decoders are threads. With the C decoder they take the GIL once per
    batch; without it (not built) every image takes it back, which costs more as threads are added.
  - `mode="process"`: decoders are processes that decode into shared memory
    (`facepipe.data.loader_shared`): no GIL between them and no pixels through a pipe, for one copy
    out of shared memory per batch. They read their row groups themselves (`cache_groups`).
* Batches are **uint8 NHWC** (pinned memory when CUDA is present): a quarter of the bytes of float,
  and the normalisation `(x - 127.5) / 128` runs on the training device as the first operation of the
  step (`facepipe.models.preprocess.to_model_input`), where it is nearly free.
* The consumer hands the pool a new batch whenever it takes one, so `prefetch` decoded batches plus
  one per decoder are ahead of it, with no extra thread between the decoders and the consumer.

Memory is bounded by those batches plus the encoded bytes of the row groups about three shuffle
windows span, independent of dataset size.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import math
import multiprocessing as mp
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from facepipe.data.loader_decode import decode_batch, decode_rows, decode_to_slot
from facepipe.data.loader_plan import Unit, batch_pieces, decode_workers, epoch_plan, group_by_unit
from facepipe.data.loader_read import ReadAhead
from facepipe.data.loader_shared import SharedSlots
from facepipe.data.worker_pool import die_with_parent
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


def _batch_buffer(shape: tuple[int, ...], pin: bool) -> tuple[Any, np.ndarray]:
    """(tensor, its numpy view) for one batch. Without CUDA the memory comes from numpy: torch's CPU
    allocator hands back fresh pages for each 5 MB batch (page faults, ~2 % of the decode time)."""
    import torch

    if pin:
        tensor = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        return tensor, tensor.numpy()
    array = np.empty(shape, dtype=np.uint8)
    return torch.from_numpy(array), array


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


class ShardLoader:
    """Per-worker iterator over shuffled, decoded batches of a set of Parquet shards.

    `for batch in loader.epoch(e)` yields `Batch(images=uint8 NHWC tensor, labels=int64 tensor)`
    (normalise them on the training device with `facepipe.models.preprocess.to_model_input`);
    `loader.epoch(e, start_batch=k)` resumes an epoch at batch k with exactly the batches a fresh
    run would have produced from k on. `workers=None` sizes the decode pool to the cores this worker
    was given (Ray's assignment, else the affinity mask); a number is capped at those cores. Up to
    `prefetch` + `workers` batches are decoded or decoding ahead of the consumer; in thread mode the
    row groups are read about 2 × `window_rows` rows ahead of those (`cache_groups`: process mode only).
    Once an epoch's last batch is handed to the decoders, thread mode starts reading the next epoch's
    first row groups, so consecutive epochs (a training run) do not wait for the reader at each start.
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
        self._next_reads: tuple[int, ReadAhead] | None = None  # (epoch, its reader) started early

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
                # a killed training process takes its decoders with it (no orphans)
                self._pool = cf.ProcessPoolExecutor(
                    self.workers, mp.get_context("spawn"), die_with_parent, (os.getpid(),)
                )
        return self._pool

    def close(self) -> None:
        self._drop_next_reads()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reads_ahead(self) -> int:
        # two windows of batches ahead: one covers the groups a window touches on a local disk;
        # on object storage a second hides the requests' latency (bench/loader.py, ratio_s3_vs_local)
        return 2 * math.ceil(self.window_rows / self.batch_size) + 1

    def _drop_next_reads(self) -> None:
        if self._next_reads is not None:
            self._next_reads[1].close()
            self._next_reads = None

    def _reader(self, epoch: int, start_batch: int, unit_idx: np.ndarray) -> ReadAhead:
        """The epoch's reader: the one started during the previous epoch when it is this one's."""
        early, self._next_reads = self._next_reads, None
        if early is not None and early[0] == epoch and start_batch == 0:
            return early[1]
        if early is not None:
            early[1].close()
        bs = self.batch_size
        return ReadAhead(self.units, unit_idx[start_batch * bs :], bs, self._reads_ahead())

    def _read_next_epoch(self, epoch: int) -> None:
        if self._next_reads is None:
            reader = ReadAhead(self.units, self.plan(epoch)[0], self.batch_size, self._reads_ahead())
            self._next_reads = (epoch, reader)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches `start_batch..steps_per_epoch-1` of `epoch`, decoded ahead in the background."""
        unit_idx, row_idx, flips = self.plan(epoch)
        pool, pin, size, bs = self._executor(), _pinned(), self.input_size, self.batch_size
        reads, slots = None, None
        if self.mode == "thread":
            reads = self._reader(epoch, start_batch, unit_idx)
        else:  # decoders write into shared memory: the pixels cross no pipe
            slots = SharedSlots(self.prefetch + self.workers, (bs, *size, 3))
        rgb = self.color_order == "RGB"

        def submit(b: int) -> tuple[int, Any, Any, cf.Future]:
            sl = slice(b * bs, (b + 1) * bs)
            if slots is not None:  # (batch, its slot, -, labels to come)
                pieces, order = batch_pieces(self.units, unit_idx[sl], row_idx[sl])
                args = (pieces, flips[sl][order], size, self.color_order, self.cache_groups)
                slot = slots.take()
                return b, slot, None, pool.submit(decode_to_slot, slots.name, slot, *args)
            groups, order = group_by_unit(unit_idx[sl], row_idx[sl])
            # threads decode straight into the batch's (pinned) memory: no copy after decoding
            images, array = _batch_buffer((bs, *size, 3), pin)
            labels = np.empty(bs, dtype=np.int64)
            reads.allow(b - start_batch + 1)
            fut = pool.submit(decode_batch, reads, groups, flips[sl][order], rgb, array, labels)
            return b, images, labels, fut

        pending: collections.deque[tuple[int, Any, Any, cf.Future]] = collections.deque()
        nxt = start_batch
        try:
            while True:
                # hand the pool new batches before waiting, so it decodes while the consumer trains
                while nxt < self.steps_per_epoch and len(pending) < self.prefetch + self.workers:
                    pending.append(submit(nxt))
                    nxt += 1
                    if nxt == self.steps_per_epoch and reads is not None:
                        self._read_next_epoch(epoch + 1)  # while this epoch's last batches decode
                if not pending:
                    return
                b, images, labels, fut = pending.popleft()
                result = fut.result()
                if slots is not None:  # one copy out of the slot (`images` is its number) for reuse
                    slot, (images, array) = images, _batch_buffer((bs, *size, 3), pin)
                    np.copyto(array, slots.view(slot))
                    slots.give(slot)
                    labels = result
                yield Batch(images, _tensor(labels, pin), b)
        finally:
            for *_, fut in pending:
                fut.cancel()
            if reads is not None:
                reads.close()  # wakes tasks waiting for a row group that will not come
            cf.wait([fut for *_, fut in pending])
            if slots is not None:
                slots.close()
