"""The `.idx` side of RecordIO: parse an index file into (keys, offsets) fast, and say exactly what is
wrong with a bad one (which field, which key, which lines). Re-exported by `recordio`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from facepipe.errors import DataError

__all__ = ["read_index", "is_increasing", "sorted_unique", "record_ends"]


def read_index(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Parse an `.idx` file into (keys, offsets) int64 arrays in file order."""
    path = Path(idx_path)
    try:
        size = path.stat().st_size
        if size > _BIG_INDEX:
            keys, offsets = _read_index_arrow(path)
        else:
            values = _parse_index_text(path.read_bytes())
            if len(values) % 2:
                raise DataError("index has a line without a key and an offset", str(path))
            keys, offsets = values[0::2].copy(), values[1::2].copy()
    except OSError as err:
        raise DataError(f"cannot read index: {err.strerror}", str(path)) from err
    except (ValueError, OverflowError) as err:
        raise DataError(f"index holds a non-integer field: {err}", str(path)) from err
    # (np.unique hashes: several times slower than a sort on int64 keys; writers list keys in order)
    ordered = keys if is_increasing(keys) else np.sort(keys)
    repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(repeated):
        raise _duplicate_key_error(path, int(ordered[repeated[0]]))
    if len(offsets) and (offsets.min() < 0 or np.any(offsets % 4)):
        bad = int(keys[np.flatnonzero((offsets < 0) | (offsets % 4 != 0))[0]])
        raise DataError("index offset is negative or not 4-byte aligned", str(path), bad)
    return keys, offsets


def _duplicate_key_error(path: Path, key: int) -> DataError:
    """Name the key and the (1-based) lines that list it: found again by reading the text, on this
    error path only."""
    with open(path, "rb") as handle:
        lines = [n for n, line in enumerate(handle, 1) if line.split()[:1] == [str(key).encode()]]
    where = " and ".join(map(str, lines[:2])) + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
    return DataError(f"index lists key {key} more than once, on lines {where}", str(path), key)


_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(b" \t\n\r\v\f")] = True
_INDEX_CHARACTERS = b"0123456789- \t\n\r\v\f"


def _parse_index_text(data: bytes) -> np.ndarray:
    """The whitespace-separated integers of an `.idx` file, as int64.

    numpy's C text parser reads a clean file ~10x faster than splitting it into Python bytes; anything
    it could misread (other characters, a parse stopping early, a saturated out-of-range value, a count
    that differs from the whitespace-separated fields) goes the slow way, which names the bad field.
    """
    if not data.translate(None, _INDEX_CHARACTERS):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                values = np.fromstring(data, dtype=np.int64, sep=" ")
            except (ValueError, DeprecationWarning):
                values = None
        if values is not None:
            blank = _WHITESPACE[np.frombuffer(data, dtype=np.uint8)]
            fields = int(np.count_nonzero(~blank[1:] & blank[:-1])) + int(len(blank) > 0 and not blank[0])
            limits = np.iinfo(np.int64)
            if len(values) == fields and not np.any((values == limits.max) | (values == limits.min)):
                return values
    fields = data.split()
    return np.array(fields, dtype=np.int64) if fields else np.zeros(0, np.int64)


def is_increasing(values: np.ndarray) -> bool:
    """Whether `values` is strictly increasing (as index files usually are: a sort can be skipped)."""
    return len(values) < 2 or bool(np.all(values[1:] > values[:-1]))


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique for int arrays, by sorting (faster here than numpy's hash-based unique); `values`
    itself when it is already strictly increasing."""
    if is_increasing(values):
        return values
    ordered = np.sort(values)
    if len(ordered) == 0:
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


_BIG_INDEX = 32 << 20  # above this, parse with Arrow's CSV reader (C++, no per-line Python objects)


def _read_index_arrow(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    try:
        table = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(column_names=["key", "offset"]),
            parse_options=pcsv.ParseOptions(delimiter="\t"),
            convert_options=pcsv.ConvertOptions(column_types={"key": pa.int64(), "offset": pa.int64()}),
        )
    except pa.ArrowInvalid as err:
        raise ValueError(str(err)) from err
    return table["key"].to_numpy(), table["offset"].to_numpy()


def record_ends(idx_offsets: np.ndarray, file_size: int, offsets: np.ndarray) -> np.ndarray:
    """For each offset, where the next indexed record starts (or the file end): its largest extent."""
    physical = sorted_unique(idx_offsets)
    nxt = np.searchsorted(physical, offsets, side="right")
    ends = np.where(nxt < len(physical), physical[np.minimum(nxt, len(physical) - 1)], file_size)
    return np.maximum(ends, offsets)
