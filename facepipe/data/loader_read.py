"""Row groups for the loader: zero-copy payload views, a small per-process cache, and a read-ahead thread.

`ReadAhead` serves the thread-mode loader: from an epoch's plan it knows, for every row group, the
first batch that needs it and how many batches use it, so one reader thread fetches the groups in
order of first use a bounded number of batches before the decoders need them, and each group is
dropped when the last batch using it is decoded. On object storage each group is one coalesced
range read (`pre_buffer`), overlapping the decoding instead of stalling it. `cached_group` is the
simple path for `decode_rows` callers (process mode, fine-tuning, feature extraction).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from facepipe.data.loader_plan import Unit, read_schedule
from facepipe.errors import DataError

__all__ = ["BinaryColumn", "ReadAhead", "cached_group", "open_shard", "read_group"]

COLUMNS = ["image", "label"]


class BinaryColumn:
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

    def spans(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) of `rows` in `data`, int64; a null row gets an empty span."""
        starts, ends = self.offsets[rows].astype(np.int64), self.offsets[rows + 1].astype(np.int64)
        if self.valid is not None:
            ends = np.where(self.valid[rows], ends, starts)
        return starts, ends


def open_shard(path: str) -> Any:
    """A `ParquetFile` for `path`; on object storage each row-group read is one coalesced range request."""
    import pyarrow.parquet as pq

    from facepipe.storage import is_remote, open_input_file

    try:
        if is_remote(path):
            return pq.ParquetFile(open_input_file(path), pre_buffer=True)
        return pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad footer
        raise DataError(f"cannot open shard: {err}", path=path) from err


def read_group(handle: Any, path: str, row_group: int) -> tuple[BinaryColumn, np.ndarray]:
    """(image column, label column) of one row group of an open shard."""
    try:
        # no Arrow thread pool: two column chunks are read faster than tasks are handed over
        table = handle.read_row_group(row_group, columns=COLUMNS, use_threads=False)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot read row group {row_group}: {err}", path=path) from err
    return BinaryColumn(table.column("image").combine_chunks()), table.column("label").to_numpy()


_CACHE_LOCK = threading.Lock()
_CACHE: collections.OrderedDict[tuple[str, int], tuple[BinaryColumn, np.ndarray]] = collections.OrderedDict()


def cached_group(path: str, row_group: int, cache_groups: int) -> tuple[BinaryColumn, np.ndarray]:
    """`read_group` through a small per-process LRU cache (for callers that decode by row-group pieces)."""
    key = (path, row_group)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    handle = open_shard(path)
    try:
        value = read_group(handle, path, row_group)
    finally:
        handle.close(force=True)
    with _CACHE_LOCK:
        _CACHE[key] = value
        while len(_CACHE) > max(cache_groups, 1):
            _CACHE.popitem(last=False)
    return value


class ReadAhead:
    """An epoch's row groups, read on a thread in order of first use and dropped after their last use.

    `unit_idx` is the unit of every sample of the batches to come (batch k is `unit_idx[k*B:(k+1)*B]`).
    A group is read once its first batch is below `allowed + ahead`, where `allow(n)` says n batches
    were handed to the decoders; so memory holds the groups of about `ahead` batches beyond those in
    flight, whatever the dataset size. `get` waits for a group, `release` drops a batch's groups.
    """

    def __init__(self, units: Sequence[Unit], unit_idx: np.ndarray, batch_size: int, ahead: int) -> None:
        self.units, self.ahead = units, max(int(ahead), 1)
        self._order, self._uses = read_schedule(unit_idx, batch_size)
        self._groups: dict[int, tuple[BinaryColumn, np.ndarray]] = {}
        self._cond = threading.Condition()
        self._allowed, self._stop, self._error = 0, False, None
        self._thread = threading.Thread(target=self._run, name="facepipe-reader", daemon=True)
        self._thread.start()

    def allow(self, batches: int) -> None:
        """`batches` batches of the epoch have been handed to the decoders."""
        with self._cond:
            self._allowed = max(self._allowed, batches)
            self._cond.notify_all()

    def get(self, unit: int) -> tuple[BinaryColumn, np.ndarray]:
        """The (image column, labels) of `unit`, once read."""
        with self._cond:
            self._cond.wait_for(lambda: unit in self._groups or self._error is not None or self._stop)
            group = self._groups.get(unit)
            if group is None:
                raise self._error if self._error is not None else DataError("loader closed")
            return group

    def ready(self, unit: int) -> bool:
        """Whether `unit` is read (a glance without waiting: a dict lookup is atomic)."""
        return unit in self._groups

    def release(self, units: Sequence[int]) -> None:
        """A batch that used `units` is decoded: drop the groups no later batch needs."""
        with self._cond:
            for unit in units:
                self._uses[unit] -= 1
                if self._uses[unit] == 0:
                    self._groups.pop(unit, None)

    def held(self) -> int:
        """Row groups in memory now."""
        with self._cond:
            return len(self._groups)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        files: collections.OrderedDict[str, Any] = collections.OrderedDict()
        try:
            for unit, first in self._order:
                with self._cond:
                    self._cond.wait_for(lambda f=first: f < self._allowed + self.ahead or self._stop)
                    if self._stop:
                        return
                path = self.units[unit].path
                if path not in files:
                    files[path] = open_shard(path)
                    if len(files) > 4:  # an open reader keeps its last column chunk: keep few
                        files.popitem(last=False)[1].close(force=True)
                files.move_to_end(path)
                group = read_group(files[path], path, self.units[unit].row_group)
                with self._cond:
                    self._groups[unit] = group
                    self._cond.notify_all()
        except BaseException as err:  # noqa: BLE001 - handed to the decoders waiting in `get`
            with self._cond:
                self._error = err
                self._cond.notify_all()
        finally:
            for handle in files.values():
                handle.close(force=True)
