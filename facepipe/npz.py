"""Read `.npz` inputs (features, IJB templates) safely: errors name the file, sizes are checked first.

`numpy.load` on a truncated or non-zip file raises `zipfile.BadZipFile`, `EOFError` or `zlib.error`
with no file name; and an array member whose header declares a shape larger than the data it holds
makes numpy allocate the declared size before it notices. `check_npz` reads each member's `.npy` header
only and refuses both with one DataError naming the file and the member.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib

import numpy as np

from facepipe.errors import DataError

__all__ = ["check_npz", "load_npz"]

# what a damaged or non-zip `.npz` raises inside numpy and zipfile
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)


def check_npz(path: str | os.PathLike, what: str = "npz") -> None:
    """Raise DataError unless `path` is a zip whose `.npy` members each hold all the data they declare."""
    from numpy.lib import format as npy

    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = npy.read_magic(member)
                    read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                    shape, _, dtype = read(member, max_header_size=1 << 16)
                    header = member.tell()
                declared = math.prod(shape) * dtype.itemsize
                available = info.file_size - header
                if dtype.hasobject:
                    raise DataError(f"array {info.filename!r} holds Python objects (refused)", str(path))
                if declared > available:
                    raise DataError(
                        f"array {info.filename!r} declares shape {shape} ({declared} bytes) but holds only "
                        f"{available} bytes: the file is truncated or damaged",
                        str(path),
                    )
    except DataError:
        raise
    except _READ_ERRORS as err:
        raise DataError(
            f"cannot read {what} file ({type(err).__name__}: {err}); it is not a complete .npz (zip) "
            "archive: write it again",
            str(path),
        ) from None


def load_npz(path: str | os.PathLike, what: str = "npz") -> dict[str, np.ndarray]:
    """Every array of a checked `.npz` (no pickles); DataError naming the file on any damage."""
    check_npz(path, what)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except _READ_ERRORS as err:  # e.g. a member's compressed data damaged after its header
        raise DataError(f"cannot read {what} file ({type(err).__name__}: {err})", str(path)) from None
