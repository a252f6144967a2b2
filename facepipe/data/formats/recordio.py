"""MXNet RecordIO (`.rec` / `.idx`) read and written without MXNet.

Byte layout (dmlc-core recordio): a file is a run of 4-byte aligned frames

    magic u32 = 0xCED7230A | lrec u32 (cflag = lrec >> 29, length = lrec & 0x1FFFFFFF) | data | zero pad

A logical record that contains the magic word at an aligned offset is written as several frames (cflag 1
first, 2 middle, 3 last) with the magic words dropped; the reader puts them back. The `.idx` file is text,
one `key\\toffset` line per record in write order. Image records start with MXNet's IRHeader (`<IfQQ`:
flag, label, id, id2); when flag > 0 the label is `flag` float32 values after the header.

Readers use mmap, so random access by key touches only the pages of that record.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from facepipe.data.formats.recordio_index import _parse_index_text, is_increasing, read_index, sorted_unique  # noqa: F401
from facepipe.errors import DataError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_RECORD_LENGTH = (1 << 29) - 1
_LENGTH_MASK = (1 << 29) - 1
_FRAME = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
IR_SIZE = _IR.size  # 24


class IRHeader(NamedTuple):
    """MXNet's image-record header. `label` is a float (flag == 0) or a float32 array (flag > 0)."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def _is_scalar(label: object) -> bool:
    return isinstance(label, (int, float, np.integer, np.floating)) or (
        isinstance(label, np.ndarray) and label.ndim == 0
    )


def pack(header: IRHeader, payload: bytes) -> bytes:
    """Serialise a header and payload like `mx.recordio.pack`: the caller's flag is ignored.

    A scalar label gives flag 0 with the label in the header; anything array-like gives
    flag = len(label), 0.0 in the header's label field, and the float32 labels after the header.
    """
    flag, label, key, key2 = header
    if _is_scalar(label):
        return _IR.pack(0, float(label), int(key), int(key2)) + bytes(payload)
    labels = np.asarray(label, dtype="<f4").reshape(-1)
    return _IR.pack(labels.size, 0.0, int(key), int(key2)) + labels.tobytes() + bytes(payload)


def unpack(record: bytes | memoryview) -> tuple[IRHeader, bytes]:
    """Split a record into its IRHeader and payload (the inverse of `pack`, as MXNet reads it)."""
    if len(record) < IR_SIZE:
        raise DataError(f"record of {len(record)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, key, key2 = _IR.unpack_from(record, 0)
    start = IR_SIZE
    if flag > 0:
        start += 4 * flag
        if start > len(record):
            raise DataError(f"IRHeader flag {flag} needs {start} bytes but the record has {len(record)}")
        label = np.frombuffer(record, dtype="<f4", count=flag, offset=IR_SIZE).astype(np.float32)
    return IRHeader(flag, label, key, key2), bytes(record[start:])


def header_label(header: IRHeader) -> float:
    """The class label as InsightFace reads it: the scalar, or the first value of a label array."""
    label = header.label
    return float(label) if _is_scalar(label) else float(label[0])


# ----------------------------------------------------------------------------------------------- reading


def _padded(length: int) -> int:
    return (length + 3) & ~3


def read_record_at(
    buf, offset: int, path: str | os.PathLike, key: object = None, end: int | None = None, base: int = 0
):
    """Read the logical record whose first frame starts at `offset` of `buf` (bytes/mmap/memoryview).

    Returns (record bytes, offset just past its last frame). Frames must lie within `end`
    (default: the buffer's length). Errors name the file and the key (or the offset). `buf` may hold
    the file from byte `base` on (a chunk): offsets in errors are always the file's, `offset + base`.
    """
    limit = len(buf) if end is None else end
    where = key if key is not None else f"at offset {offset + base}"
    parts: list[bytes] = []
    pos = offset
    while True:
        if pos + 8 > limit:
            if pos >= len(buf):
                raise DataError(
                    f"index entry at offset {pos + base} is past the end of the file", path, where
                )
            raise DataError(f"truncated frame header at offset {pos + base}", path, where)
        magic, lrec = _FRAME.unpack_from(buf, pos)
        if magic != MAGIC:
            raise DataError(
                f"bad magic 0x{magic:08x} at offset {pos + base} (expected 0x{MAGIC:08x})", path, where
            )
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        data_end = pos + 8 + length
        if data_end > limit:
            raise DataError(
                f"truncated record: frame at offset {pos + base} needs {length} bytes, only "
                f"{max(limit - pos - 8, 0)} remain",
                path,
                where,
            )
        if cflag > 3 or (parts and cflag in (0, 1)) or (not parts and cflag in (2, 3)):
            raise DataError(f"bad continuation flag {cflag} at offset {pos + base}", path, where)
        chunk = buf[pos + 8 : data_end]
        pos = pos + 8 + _padded(length)
        if cflag == 0:
            return bytes(chunk), pos
        parts.append(bytes(chunk))
        if cflag == 3:
            return MAGIC_BYTES.join(parts), pos


def _open_mmap(path: str | os.PathLike):
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return None, 0
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), size


def read_records(path: str | os.PathLike) -> Iterator[bytes]:
    """Yield every logical record of a `.rec` file in file order (empty records included)."""
    mm, size = _open_mmap(path)
    if mm is None:
        return
    try:
        mm.madvise(mmap.MADV_SEQUENTIAL)
        unpack_from = _FRAME.unpack_from
        pos = 0
        index = 0
        while pos < size:
            # Fast path: a whole record in one frame; anything else goes through read_record_at.
            if pos + 8 <= size:
                magic, lrec = unpack_from(mm, pos)
                length = lrec & _LENGTH_MASK
                if magic == MAGIC and lrec >> 29 == 0 and pos + 8 + length <= size:
                    yield mm[pos + 8 : pos + 8 + length]
                    pos += 8 + ((length + 3) & ~3)
                    index += 1
                    continue
            record, pos = read_record_at(mm, pos, path, f"#{index} (offset {pos})")
            yield record
            index += 1
    finally:
        mm.close()


class IndexedRecordFile:
    """Random access to a `.rec` file through its `.idx` (MXNet's MXIndexedRecordIO, read side).

    `keys` keeps the index's file order; lookups go through a sorted key array, so memory stays two
    int64 arrays even for tens of millions of records.
    """

    def __init__(self, rec: str | os.PathLike, idx: str | os.PathLike):
        self.rec_path = str(rec)
        self.idx_path = str(idx)
        self.key_array, self.offset_array = read_index(idx)
        if is_increasing(self.key_array):
            self._sorted_keys, self._sorted_offsets = self.key_array, self.offset_array
        else:
            order = np.argsort(self.key_array, kind="stable")
            self._sorted_keys = self.key_array[order]
            self._sorted_offsets = self.offset_array[order]
        try:
            self._mm, self.size = _open_mmap(rec)
        except OSError as err:
            raise DataError(f"cannot open record file: {err.strerror}", self.rec_path) from err
        self._physical: np.ndarray | None = None  # sorted offsets, built on the first read()

    def _end_of(self, offset: int) -> int:
        """The next indexed record's start (or the file size): a corrupt length is caught there instead
        of silently reading into the neighbour."""
        if self._physical is None:
            self._physical = sorted_unique(self.offset_array)
        j = int(np.searchsorted(self._physical, offset, side="right"))
        return int(self._physical[j]) if j < len(self._physical) else self.size

    @property
    def keys(self) -> list[int]:
        return self.key_array.tolist()

    def __len__(self) -> int:
        return len(self.key_array)

    def __contains__(self, key: int) -> bool:
        i = np.searchsorted(self._sorted_keys, key)
        return bool(i < len(self._sorted_keys) and self._sorted_keys[i] == key)

    def _locate(self, key: int) -> int:
        i = int(np.searchsorted(self._sorted_keys, key))
        if i >= len(self._sorted_keys) or self._sorted_keys[i] != key:
            raise DataError(f"key {key} is not in the index", self.idx_path, key)
        return i

    def missing(self, keys: np.ndarray) -> np.ndarray:
        """Those of `keys` the index does not list."""
        keys = np.asarray(keys, dtype=np.int64)
        return keys[~self._look_up(keys)[1]]

    def _look_up(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each key's position in the sorted keys, and whether it is there."""
        pos = np.searchsorted(self._sorted_keys, keys)
        found = pos < len(self._sorted_keys)
        found[found] = self._sorted_keys[pos[found]] == keys[found]
        return pos, found

    def offsets_of(self, keys: np.ndarray) -> np.ndarray:
        """Offsets of many keys at once; a key missing from the index raises DataError naming it."""
        keys = np.asarray(keys, dtype=np.int64)
        pos, found = self._look_up(keys)
        if not found.all():
            key = int(keys[np.flatnonzero(~found)[0]])
            raise DataError(f"key {key} is not in the index", self.idx_path, key)
        return self._sorted_offsets[pos]

    def words(self) -> np.ndarray:
        """The file as little-endian uint32 words (a view of the mapping; for vectorised header reads)."""
        if self._mm is None:
            return np.zeros(0, dtype="<u4")
        return np.frombuffer(self._mm, dtype="<u4", count=self.size // 4)

    def offset(self, key: int) -> int:
        return int(self._sorted_offsets[self._locate(key)])

    def read(self, key: int) -> bytes:
        i = self._locate(key)
        offset = int(self._sorted_offsets[i])
        end = self._end_of(offset)
        if self._mm is None or offset >= self.size:
            raise DataError(f"index entry at offset {offset} is past the end of the file", self.rec_path, key)
        # A record may extend past the next indexed offset only if the idx skipped records; allow the
        # file end then, since MXNet itself would read it.
        try:
            return read_record_at(self._mm, offset, self.rec_path, key, end)[0]
        except DataError:
            if end == self.size:
                raise
            return read_record_at(self._mm, offset, self.rec_path, key)[0]

    def read_header(self, key: int) -> tuple[IRHeader, bytes]:
        record = self.read(key)
        try:
            return unpack(record)
        except DataError as err:
            raise DataError(str(err), self.rec_path, key) from None

    def close(self) -> None:
        if self._mm is not None:
            # a numpy view from words() may still be alive (after an error): the GC unmaps it later
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None

    def __enter__(self) -> IndexedRecordFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------- writing


def encode_frames(record: bytes) -> bytes:
    """The on-disk frames for one logical record, split at aligned magic words exactly as dmlc does."""
    n = len(record)
    if n > MAX_RECORD_LENGTH:
        raise ValueError(f"record of {n} bytes exceeds the RecordIO limit of {MAX_RECORD_LENGTH}")
    cuts = _aligned_magic_positions(record)
    if not cuts:
        return _frame(0, record)
    out = []
    start = 0
    for i, cut in enumerate(cuts):
        out.append(_frame(1 if i == 0 else 2, record[start:cut]))
        start = cut + 4
    out.append(_frame(3, record[start:]))
    return b"".join(out)


def _aligned_magic_positions(record: bytes) -> list[int]:
    words = len(record) // 4
    if words == 0 or MAGIC_BYTES not in record:
        return []
    aligned = np.frombuffer(record, dtype="<u4", count=words)
    return (np.flatnonzero(aligned == MAGIC) * 4).tolist()


def _frame(cflag: int, data: bytes) -> bytes:
    length = len(data)
    return _FRAME.pack(MAGIC, (cflag << 29) | length) + bytes(data) + b"\0" * (_padded(length) - length)


class RecordWriter:
    """Sequential `.rec` writer with MXNet's byte layout (MXRecordIO, write side)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()/__exit__
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def write(self, record: bytes) -> int:
        """Append one logical record; returns the offset where its first frame starts."""
        offset = self._pos
        data = encode_frames(bytes(record))
        self._file.write(data)
        self._pos += len(data)
        return offset

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class IndexedRecordWriter(RecordWriter):
    """`.rec` + `.idx` writer (MXIndexedRecordIO.write_idx): index lines in write order."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        super().__init__(rec_path)
        self.idx_path = str(idx_path)
        self._idx = open(idx_path, "w", encoding="ascii", newline="\n")  # noqa: SIM115
        self._seen: set[int] = set()

    def write(self, key: int, record: bytes) -> int:  # type: ignore[override]
        key = int(key)
        if key in self._seen:
            raise ValueError(f"key {key} written twice to {self.idx_path}")
        self._seen.add(key)
        offset = super().write(record)
        self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        super().close()
        if not self._idx.closed:
            self._idx.close()


def frames_of(buf, offset: int) -> list[tuple[int, int, int]]:
    """(offset, cflag, length) of each on-disk frame of the record starting at `offset` (for inspection)."""
    frames = []
    pos = offset
    while True:
        magic, lrec = _FRAME.unpack_from(buf, pos)
        if magic != MAGIC:
            raise DataError(f"bad magic at offset {pos}", None, None)
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        frames.append((pos, cflag, length))
        pos += 8 + _padded(length)
        if cflag in (0, 3):
            return frames
