"""Parse a contiguous run of RecordIO image records with numpy, and say what is wrong with bad ones.

The common record is one frame (continuation flag 0): frame header (magic, length) 8 bytes, IRHeader
24 bytes, `flag` float32 labels, payload. Those are parsed for all records at once by gathering words
at their offsets; only records split into several frames (their payload held the magic word) or
damaged ones take the per-record path of `recordio`. Problems become per-record `reasons`
(index → text); the caller stops on the first or records them all as rejects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from facepipe.data.formats.image_header import DEFAULT_MAX_PIXELS, size_problem
from facepipe.data.formats.recordio import IR_SIZE, MAGIC, read_record_at, unpack
from facepipe.errors import DataError

__all__ = ["ParsedChunk", "check_labels", "decode_or_none", "parse_chunk", "validate_images"]

_LENGTH_MASK = (1 << 29) - 1
_FRAME_HEADER = 8


@dataclass
class ParsedChunk:
    """Where each record's payload lies in the region (`starts`/`stops`), or its bytes in `slow`."""

    labels: np.ndarray  # float64: the first label value, checked later
    starts: np.ndarray
    stops: np.ndarray
    slow: dict[int, bytes] = field(default_factory=dict)  # multi-frame records, already reassembled
    reasons: dict[int, str] = field(default_factory=dict)  # record index → why it is bad
    # record index → where (in the region) bytes no index entry covers start after it, up to `avail`
    gaps: dict[int, int] = field(default_factory=dict)

    def payload(self, i: int, region: memoryview):
        if i in self.slow:
            return self.slow[i]
        return region[int(self.starts[i]) : int(self.stops[i])]


def parse_chunk(
    region: memoryview, offsets: np.ndarray, base: int, avail: np.ndarray, file_size: int,
    keys: np.ndarray, rec_path: str,
) -> ParsedChunk:  # fmt: skip
    """Records at file `offsets`, `region` holding the file from `base` on; each record has `avail`
    bytes of the region before the next record starts."""
    rel = offsets - base
    in_file = offsets < file_size
    words = np.frombuffer(region, dtype="<u4", count=len(region) // 4)
    if len(words) < 9:  # so the masked gathers below stay in bounds
        words = np.concatenate([words, np.zeros(9, dtype="<u4")])
    wi = rel // 4

    # Fast path, vectorised: one frame (cflag 0), good magic, IRHeader and labels inside the frame.
    head_ok = in_file & (rel + _FRAME_HEADER + IR_SIZE + 4 <= avail)
    safe = np.where(head_ok, wi, 0)
    magic = words[safe]
    lrec = words[safe + 1]
    length = (lrec & _LENGTH_MASK).astype(np.int64)
    flag = words[safe + 2].astype(np.int64)
    frame_end = rel + _FRAME_HEADER + length
    simple = head_ok & (magic == MAGIC) & ((lrec >> 29) == 0) & (frame_end <= avail)
    simple &= IR_SIZE + 4 * flag <= length
    # frame header = words wi, wi+1; IRHeader flag wi+2, label wi+3, id wi+4..5, id2 wi+6..7; labels from wi+8
    label_word = np.where(flag > 0, safe + 8, safe + 3)
    labels = words[np.where(simple, label_word, 0)].view("<f4").astype(np.float64)
    parsed = ParsedChunk(labels, rel + _FRAME_HEADER + IR_SIZE + 4 * flag, frame_end)
    # A record must end (frames are padded to 4 bytes) where the next indexed one starts: anything
    # between them is records the index does not list.
    padded_end = rel + _FRAME_HEADER + ((length + 3) & ~3)
    parsed.gaps = {i: int(padded_end[i]) for i in np.flatnonzero(simple & (padded_end < avail)).tolist()}

    for i in np.flatnonzero(~simple).tolist():
        try:
            if not in_file[i]:
                raise DataError(f"index entry at offset {int(offsets[i])} is past the end of the file")
            record, end = read_record_at(region, int(rel[i]), rec_path, int(keys[i]), int(avail[i]), base)
            if end < avail[i]:
                parsed.gaps[i] = end
            header, payload = unpack(record)
            labels[i] = float(header.label) if header.flag == 0 else float(header.label[0])
            parsed.slow[i] = payload
        except DataError as err:
            parsed.reasons[i] = str(err).split(" (file ")[0]

    empty = np.flatnonzero(simple & (parsed.stops == parsed.starts)).tolist()
    empty += [i for i, payload in parsed.slow.items() if not payload]
    for i in empty:
        parsed.reasons.setdefault(i, "image record has an empty payload")
    return parsed


def check_labels(task: dict, keys: np.ndarray, labels: np.ndarray, reasons: dict[int, str]) -> None:
    """Labels must be class indices below `num_classes` and agree with the identity key ranges."""
    ok = np.isfinite(labels) & (labels >= 0) & (labels == np.floor(labels))
    num_classes = task["num_classes"]
    if num_classes is not None:
        ok &= labels < num_classes
    for i in np.flatnonzero(~ok).tolist():
        if i not in reasons:
            limit = f" in [0, {num_classes})" if num_classes is not None else ""
            reasons[i] = f"label {float(labels[i]):g} is not a class index{limit}"
    starts, stops = task["identity_starts"], task["identity_ends"]
    if starts is None:
        return
    slot = np.searchsorted(starts, keys, side="right") - 1
    inside = (slot >= 0) & (keys < stops[np.maximum(slot, 0)])
    expected = slot + task["identity_base"]
    bad = ~inside | (expected != labels)
    for i in np.flatnonzero(bad).tolist():
        if i in reasons:
            continue
        if not inside[i]:
            reasons[i] = "image key lies in no identity range of the header"
        else:
            reasons[i] = f"label {labels[i]:g} disagrees with the identity ranges (class {int(expected[i])})"


def decode_or_none(data, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """BGR pixels of an encoded image, or None when it is empty, of no known format, declares more than
    `max_pixels` in its header (checked before decoding), or does not decode."""
    import cv2

    if not len(data) or size_problem(data, max_pixels) is not None:
        return None
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)


def validate_images(
    payload_of, n: int, size: tuple[int, int] | None, reasons: dict[int, str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> None:  # fmt: skip
    """Decode every not-yet-rejected image: it must decode, at the `property` size when there is one.
    An image whose header declares more than `max_pixels` is refused without being decoded."""
    for i in range(n):
        if i in reasons:
            continue
        data = payload_of(i)
        problem = size_problem(data, max_pixels) if len(data) else None
        if problem is not None and problem[0] == "too_large":
            reasons[i] = f"image refused before decoding: {problem[1]}"
            continue
        pixels = decode_or_none(data, max_pixels)
        if pixels is None:
            reasons[i] = "undecodable image"
        elif size is not None and pixels.shape[:2] != tuple(size):
            reasons[i] = f"image is {pixels.shape[0]}x{pixels.shape[1]}, property says {size[0]}x{size[1]}"
