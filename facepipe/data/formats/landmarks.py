"""Five-point landmark files: one line per image, a relative path and the points.

Accepted line shapes (fields split on tabs, spaces or commas; `#` starts a comment):
- `<path> x1 y1 x2 y2 x3 y3 x4 y4 x5 y5`: e.g. SphereFace's `lfw_landmark.txt`;
- `<path> <label> x1 y1 ... x5 y5`: the same with a class column (SphereFace's CASIA-WebFace file); the
  label is ignored because identities come from folder names.
Points are in source-image pixels, in image order: image-left eye, image-right eye, nose, image-left
mouth corner, image-right mouth corner (the order of the ArcFace template and of YuNet's output).
Paths are relative to the dataset root, with `/` separators.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from facepipe.errors import DataError

_SPLIT = re.compile(r"[\s,]+")


def normalise_key(path: str) -> str:
    """The form paths are compared in: `/` separators, no leading `./` or `/`."""
    key = path.replace("\\", "/").strip()
    while key.startswith("./"):
        key = key[2:]
    return key.lstrip("/")


def parse_landmark_line(line: str, path: str | os.PathLike = "<string>", lineno: int = 0):
    """Parse one line; returns `(key, points (5, 2) float32)` or None for blank/comment lines."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    fields = [f for f in _SPLIT.split(text) if f]
    name, numbers = fields[0], fields[1:]
    if len(numbers) not in (10, 11):
        raise DataError(
            f"expected an image path and 10 coordinates (maybe after a label), got {len(numbers)} numbers",
            path=os.fspath(path),
            record=f"line {lineno}",
        )
    try:
        values = np.array([float(v) for v in numbers[-10:]], dtype=np.float32)
    except ValueError as err:
        raise DataError(
            f"non-numeric coordinate: {err}", path=os.fspath(path), record=f"line {lineno}"
        ) from err
    if not np.all(np.isfinite(values)):
        raise DataError("non-finite coordinate", path=os.fspath(path), record=f"line {lineno}")
    return normalise_key(name), values.reshape(5, 2)


def iter_landmark_file(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Stream `(key, points)` pairs from a landmark file without loading it whole.

    Bytes that are not UTF-8 are read as Python reads file names (surrogate escapes), so a line names
    an image whose file name is not UTF-8 by the same bytes, and matches it.
    """
    path = Path(path)
    try:
        handle = path.open("r", encoding="utf-8", errors="surrogateescape")
    except OSError as err:
        raise DataError(f"cannot open landmark file: {err.strerror}", path=os.fspath(path)) from err
    with handle:
        for lineno, line in enumerate(handle, start=1):
            parsed = parse_landmark_line(line, path, lineno)
            if parsed is not None:
                yield parsed


def load_landmarks(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All entries of a landmark file as `key -> (5, 2) float32`; a repeated key is an error."""
    table: dict[str, np.ndarray] = {}
    for key, points in iter_landmark_file(path):
        if key in table:
            raise DataError(f"image {key!r} is listed twice", path=os.fspath(path))
        table[key] = points
    return table


def group_by_identity(table: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Split `identity/.../file -> points` by the first path component (the identity folder)."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, points in table.items():
        identity, sep, _ = key.partition("/")
        if sep:
            groups.setdefault(identity, {})[key] = points
    return groups
