"""The InsightFace training-set layout on top of RecordIO: header record, identity records, `property`.

- key 0 (when its flag > 0 and its payload is empty) is the header: labels `[A, B]`; image keys are
  `1..A-1`, identity keys `A..B-1`.
- identity record `A + c` holds `[first_image_key, end_image_key)` of class c.
- image records carry the class as a scalar label (RecBuilder) or as `[class, 1.0]` (face2rec2).
- `property` is one line `classes,height,width`.
- without a header (flag 0 at key 0, or no key 0) every indexed key is an image, as MXFaceDataset does.

Physical order differs between builders (RecBuilder writes the header last, face2rec2 between images and
identities), so everything is looked up through the index.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facepipe.data.formats.recordio import MAGIC, IndexedRecordFile, IndexedRecordWriter, IRHeader, pack
from facepipe.errors import DataError
from facepipe.fsutil import atomic_path, write_bytes_atomic

__all__ = [
    "PROBE_RECORDS",
    "TrainingSet",
    "readable_records",
    "find_training_files",
    "open_training_set",
    "read_property",
    "write_training_set",
]


# Records tried, in key order, to learn the label convention or the image size: the first that reads wins.
PROBE_RECORDS = 64


@dataclass
class TrainingSet:
    """What a decoder needs to know about one `.rec` training set (arrays are in index file order)."""

    rec_path: Path
    idx_path: Path
    property_path: Path | None
    num_classes: int | None  # from `property`, else the identity count, else unknown
    image_size: tuple[int, int] | None  # (height, width) from `property`
    layout: str  # "header" (InsightFace header + identities) or "flat" (every key is an image)
    header: tuple[int, int] | None  # (A, B) from record 0
    image_keys: np.ndarray  # int64
    identity_starts: np.ndarray | None  # int64, class c's first image key
    identity_ends: np.ndarray | None  # int64, class c's end key (exclusive)
    label_convention: str  # "scalar" (RecBuilder), "array" (face2rec2), "none" or "unknown" (all damaged)
    idx_keys: np.ndarray | None = field(default=None, repr=False)  # the whole index, file order
    idx_offsets: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_images(self) -> int:
        return len(self.image_keys)


def read_property(path: str | os.PathLike) -> tuple[int, int, int]:
    """`classes,height,width` from an InsightFace `property` file (extra lines, if any, are ignored)."""
    text = Path(path).read_text(encoding="ascii", errors="replace").strip().splitlines()
    try:
        classes, height, width = (int(v) for v in text[0].split(","))
    except (IndexError, ValueError):
        raise DataError("property file must hold one line 'classes,height,width'", str(path)) from None
    if classes <= 0 or height <= 0 or width <= 0:
        raise DataError(f"property values must be positive, got {classes},{height},{width}", str(path))
    return classes, height, width


def find_training_files(src: str | os.PathLike) -> tuple[Path, Path, Path | None]:
    """Locate (rec, idx, property) from a dataset folder or a `.rec` path."""
    src = Path(src)
    if src.is_file():
        rec = src
    elif src.is_dir():
        rec = src / "train.rec"
        if not rec.exists():
            candidates = sorted(p for p in src.glob("*.rec") if p.with_suffix(".idx").exists())
            if len(candidates) != 1:
                found = ", ".join(p.name for p in candidates) or "none"
                raise DataError(
                    f"expected train.rec or exactly one indexed .rec file, found {found}", str(src)
                )
            rec = candidates[0]
    else:
        raise DataError("source does not exist", str(src))
    idx = rec.with_suffix(".idx")
    if not idx.exists():
        raise DataError("index file is missing", str(idx))
    prop = next((p for p in (rec.with_suffix(".property"), rec.parent / "property") if p.is_file()), None)
    return rec, idx, prop


def open_training_set(src: str | os.PathLike, skip_bad: bool = False) -> TrainingSet:
    """Read the header and identity records of a training set and check that they are consistent.

    With `skip_bad`, an unreadable record 0 (header or first image: it cannot be told) makes the set
    flat, so every record is converted or rejected on its own instead of stopping the run.
    """
    rec_path, idx_path, prop_path = find_training_files(src)
    num_classes = image_size = None
    if prop_path is not None:
        num_classes, height, width = read_property(prop_path)
        image_size = (height, width)
    with IndexedRecordFile(rec_path, idx_path) as rec:
        try:
            header = _read_header(rec)
        except DataError:
            if not skip_bad:
                raise
            header = None
        if header is None:
            keys = rec.key_array
            convention = _label_convention(rec, keys[:PROBE_RECORDS])
            return TrainingSet(
                rec_path, idx_path, prop_path, num_classes, image_size, "flat", None, keys.copy(),
                None, None, convention, rec.key_array, rec.offset_array,
            )  # fmt: skip
        a, b = header
        image_keys = np.arange(1, a, dtype=np.int64)
        missing = rec.missing(image_keys)
        if len(missing):
            raise DataError(
                f"header record says image keys are 1..{a - 1} but {len(missing)} of them are not "
                "in the index",
                str(idx_path),
                int(missing[0]),
            )
        starts, ends = _read_identities(rec, a, b)
        convention = _label_convention(rec, range(1, min(a, 1 + PROBE_RECORDS)))
        idx_keys, idx_offsets = rec.key_array, rec.offset_array
    if starts is not None:
        if num_classes is not None and num_classes != len(starts):
            raise DataError(
                f"property says {num_classes} classes but the header record lists {len(starts)} identities",
                str(prop_path),
            )
        num_classes = len(starts)
    return TrainingSet(
        rec_path, idx_path, prop_path, num_classes, image_size, "header", header, image_keys,
        starts, ends, convention, idx_keys, idx_offsets,
    )  # fmt: skip


def readable_records(rec: IndexedRecordFile, keys: Iterable[int]) -> Iterator[tuple[IRHeader, bytes]]:
    """(header, payload) of those of `keys` whose records read; damaged ones are passed over (the
    conversion reports each of them, with its offset, or rejects it with --skip-bad)."""
    for key in keys:
        try:
            yield rec.read_header(int(key))
        except DataError:
            continue


def _label_convention(rec: IndexedRecordFile, keys: Iterable[int]) -> str:
    """ "scalar" or "array" from the first image record that reads; "none" without images, "unknown"
    when none of the first PROBE_RECORDS reads (so one damaged record 1 does not stop the run)."""
    keys = list(keys)
    for header, _ in readable_records(rec, keys):
        return "scalar" if header.flag == 0 else "array"
    return "unknown" if keys else "none"


def _read_header(rec: IndexedRecordFile) -> tuple[int, int] | None:
    if 0 not in rec:
        return None
    header, payload = rec.read_header(0)
    if header.flag < 2 or payload:
        return None  # an ordinary image at key 0 (the newer rec_builder starts images at 0)
    a, b = float(header.label[0]), float(header.label[1])
    if not (a.is_integer() and b.is_integer() and 1 <= a <= b):
        raise DataError(f"header record labels [{a}, {b}] are not a valid key range", rec.rec_path, 0)
    return int(a), int(b)


def _read_identities(rec: IndexedRecordFile, a: int, b: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """[first, end) image keys of each class from identity records A..B-1, checked to be ordered,
    non-overlapping and inside 1..A-1. Read vectorised (millions of classes in WebFace42M)."""
    if b == a:
        return None, None
    keys = np.arange(a, b, dtype=np.int64)
    try:
        offsets = rec.offsets_of(keys)
    except DataError as err:
        raise DataError(
            f"identity record of class {int(err.record) - a} is missing from the index",
            rec.idx_path,
            err.record,
        ) from None
    firsts, ends = _identity_labels_fast(rec, offsets)
    for i in np.flatnonzero(np.isnan(firsts)).tolist():  # anything unusual: read it one by one
        header, _ = rec.read_header(int(keys[i]))
        if header.flag < 2:
            raise DataError(
                f"identity record of class {i} has no [first, end) labels", rec.rec_path, int(keys[i])
            )
        firsts[i], ends[i] = float(header.label[0]), float(header.label[1])
    integral = (firsts == np.floor(firsts)) & (ends == np.floor(ends))
    prev_end = np.concatenate([[1.0], ends[:-1]])
    ok = integral & (prev_end <= firsts) & (firsts <= ends) & (ends <= a)
    if not ok.all():
        c = int(np.flatnonzero(~ok)[0])
        first, end = firsts[c], ends[c]
        reason = (
            f"identity range [{first}, {end}) is not integral"
            if not integral[c]
            else f"identity range [{int(first)}, {int(end)}) of class {c} overlaps the previous class or "
            f"leaves the image keys 1..{a - 1}"
        )
        raise DataError(reason, rec.rec_path, int(keys[c]))
    return firsts.astype(np.int64), ends.astype(np.int64)


def _identity_labels_fast(rec: IndexedRecordFile, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels of well-formed identity records (one frame of 32 bytes, flag 2); NaN where not."""
    words = rec.words()
    firsts = np.full(len(offsets), np.nan)
    ends = np.full(len(offsets), np.nan)
    if len(words) < 10:
        return firsts, ends
    wi = offsets // 4
    ok = (offsets % 4 == 0) & (offsets + 40 <= rec.size)
    safe = np.where(ok, wi, 0)
    # words: magic, lrec (cflag 0, length 32), flag, label field, id x2, id2 x2, labels[0], labels[1]
    ok &= (words[safe] == MAGIC) & (words[safe + 1] == 32) & (words[safe + 2] == 2)
    firsts[ok] = words[safe[ok] + 8].view("<f4")
    ends[ok] = words[safe[ok] + 9].view("<f4")
    del words
    return firsts, ends


def write_training_set(
    out_dir: str | os.PathLike,
    classes: Iterable[list[bytes]],
    image_size: tuple[int, int] = (112, 112),
    prefix: str = "train",
    convention: str = "recbuilder",
) -> dict:
    """Write encoded images, grouped by class in class order, as an InsightFace training set.

    `convention="recbuilder"`: scalar labels; images, then identities, then the header (key 0, id2=1)
    last, as InsightFace's RecBuilder does. `convention="face2rec2"`: labels `[class, 1.0]`; images, then
    the header (id2=0), then identities. Files are renamed into place only when complete.
    Returns paths and counts.
    """
    if convention not in ("recbuilder", "face2rec2"):
        raise ValueError(f"unknown convention {convention!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rec_final, idx_final = out / f"{prefix}.rec", out / f"{prefix}.idx"
    ranges: list[tuple[int, int]] = []
    with (
        atomic_path(rec_final) as rec_tmp,
        atomic_path(idx_final) as idx_tmp,
        IndexedRecordWriter(rec_tmp, idx_tmp) as writer,
    ):
        key = 1
        for class_id, images in enumerate(classes):
            first = key
            for image in images:
                label = float(class_id) if convention == "recbuilder" else [float(class_id), 1.0]
                writer.write(key, pack(IRHeader(0, label, key, 0), image))
                key += 1
            ranges.append((first, key))
        a = key
        b = a + len(ranges)
        header = pack(IRHeader(0, [float(a), float(b)], 0, 1 if convention == "recbuilder" else 0), b"")
        if convention == "face2rec2":
            writer.write(0, header)
        for c, (first, end) in enumerate(ranges):
            writer.write(a + c, pack(IRHeader(0, [float(first), float(end)], a + c, 0), b""))
        if convention == "recbuilder":
            writer.write(0, header)
    prop = out / ("property" if prefix == "train" else f"{prefix}.property")
    write_bytes_atomic(prop, f"{len(ranges)},{image_size[0]},{image_size[1]}\n".encode())
    return {
        "rec": str(rec_final),
        "idx": str(idx_final),
        "property": str(prop),
        "num_images": a - 1,
        "num_classes": len(ranges),
    }
