"""Nothing in a `.rec` is silently dropped: every byte must belong to a record its `.idx` lists.

An index that lists fewer records than the file holds (a truncated or empty `.idx`, a record appended
without an index line) would otherwise make decode skip them and report success. The image records are
checked by the range workers as they parse (a record must end where the next indexed one starts, see
`decode_parse`); this module checks the rest (the bytes before the first indexed record, and after the
header and identity records) and, for either, walks an unindexed stretch to say what it holds: one
reject per record found there (key -1: the index gives it none), or one for bytes that are no record.
"""

from __future__ import annotations

import contextlib
import mmap
import os

import numpy as np

from facepipe.data.formats.insightface import TrainingSet
from facepipe.data.formats.recordio import MAGIC, MAX_RECORD_LENGTH, read_record_at
from facepipe.data.formats.recordio_index import record_ends
from facepipe.errors import DataError

__all__ = ["UNINDEXED_KEY", "check_outside_images", "first_problem", "gap_rejects", "unindexed_records"]

UNINDEXED_KEY = -1  # the rejects table's key for a record the index does not list


def unindexed_records(buf, start: int, stop: int, path: str, base: int = 0) -> list[tuple[int, str]]:
    """(offset in the file, reason) for each record in `buf[start:stop]` (the file from `base` on): none of
    them is indexed."""
    found = []
    pos = start
    while pos < stop:
        try:
            _, end = read_record_at(buf, pos, path, end=stop, base=base)
        except DataError:
            at = pos + base
            found.append((at, f"{stop - pos} bytes at offset {at} are not in the index, nor a record"))
            break
        found.append((pos + base, f"record at offset {pos + base} is not in the index"))
        pos = end
    return found


def _as_rejects(dataset: str, found: list[tuple[int, str]]) -> list[dict]:
    return [
        {"source": dataset, "key": UNINDEXED_KEY, "reason": reason, "offset": offset}
        for offset, reason in found
    ]


def unindexed_error(path: str, offset: int, after: object = None) -> DataError:
    """The error for a stretch the index leaves out, without --skip-bad."""
    where = f" (after record {after})" if after is not None else ""
    return DataError(
        f"the index lists fewer records than the file holds: bytes at offset {offset}{where} belong to no "
        "indexed record; rebuild the .idx, or pass --skip-bad to list the unindexed records in the rejects",
        path,
        f"at offset {offset}",
    )


def _frame_ends(mm, offsets: np.ndarray, limits: np.ndarray, path: str) -> np.ndarray:
    """Where each record at `offsets` ends (past its padded last frame); -1 where it does not read.
    Single-frame records (identities, the header: millions in WebFace42M) are read vectorised."""
    ends = np.full(len(offsets), -1, dtype=np.int64)
    if len(mm) >= 8 and len(offsets):
        words = np.frombuffer(mm, dtype="<u4", count=len(mm) // 4)
        inside = (offsets % 4 == 0) & (offsets + 8 <= len(mm))
        wi = np.where(inside, offsets // 4, 0)
        magic, lrec = words[wi], words[wi + inside].astype(np.int64)
        del words  # the mapping closes only without views on it
        frame_end = offsets + 8 + (((lrec & MAX_RECORD_LENGTH) + 3) & ~3)
        simple = inside & (magic == MAGIC) & (lrec >> 29 == 0) & (frame_end <= limits + 3)
        ends = np.where(simple, frame_end, -1)
    for i in np.flatnonzero(ends < 0).tolist():  # several frames, or damaged: the careful way
        with contextlib.suppress(DataError):  # a damaged header or identity record is reported where read
            ends[i] = read_record_at(mm, int(offsets[i]), path, end=int(limits[i]))[1]
    return ends


def check_outside_images(ts: TrainingSet, skip_bad: bool, dataset: str) -> list[dict]:
    """Check the stretches no image range covers: before the first indexed record, and after each
    indexed record that is not an image (header, identities). Raises, or returns rejects (--skip-bad)."""
    rec_path, idx_keys, idx_offsets = str(ts.rec_path), ts.idx_keys, ts.idx_offsets
    size = os.path.getsize(rec_path)
    if size == 0:
        if len(idx_keys):
            return []  # the workers report each indexed record as past the end of the file
        raise DataError("the .rec file and its index are empty: there is nothing to decode", rec_path)

    others = np.zeros(0, dtype=np.int64)
    if ts.layout == "header":  # image keys are 1..A-1; records past the end are reported where read
        is_image = (idx_keys >= 1) & (idx_keys < ts.header[0])
        others = np.setdiff1d(idx_offsets[~is_image], idx_offsets[is_image])
        others = others[others < size]
    first = min(int(idx_offsets.min()), size) if len(idx_offsets) else size
    with open(rec_path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        limits = np.minimum(record_ends(idx_offsets, size, others), size)
        ends = _frame_ends(mm, others, limits, rec_path)
        gap = (ends >= 0) & (ends < limits)
        stretches = list(zip(ends[gap].tolist(), limits[gap].tolist(), strict=True))
        stretches += [(0, first)] if first > 0 else []
        rejects = []
        for start, stop in sorted(stretches):
            if not skip_bad:
                raise unindexed_error(rec_path, start)
            rejects += _as_rejects(dataset, unindexed_records(mm, start, stop, rec_path))
    return rejects


def gap_rejects(
    gaps: dict[int, int], region, avail: np.ndarray, path: str, base: int, dataset: str
) -> list[dict]:
    """Rejects for the unindexed stretches after a chunk's records (`gaps`: record → region offset where
    the stretch starts; it runs to `avail` of that record). Two keys at one offset share a stretch."""
    stretches = {start: int(avail[i]) for i, start in gaps.items()}
    rejects: list[dict] = []
    for start, stop in sorted(stretches.items()):
        rejects += _as_rejects(dataset, unindexed_records(region, start, stop, path, base))
    return rejects


def first_problem(
    reasons: dict[int, str], gaps: dict[int, int], keys: np.ndarray, offsets: np.ndarray, path: str, base: int
) -> DataError | None:
    """The error for the chunk's first bad record in file order, else for the first bytes the index
    leaves out (often the result of a bad index entry, which is the better thing to name); every error
    names the file, the record and its offset in the file."""
    if reasons:
        i = min(reasons, key=lambda j: int(offsets[j]))
        return DataError(reasons[i], path, f"{int(keys[i])} at offset {int(offsets[i])}")
    if gaps:
        i = min(gaps, key=lambda j: gaps[j])
        return unindexed_error(path, gaps[i] + base, int(keys[i]))
    return None
