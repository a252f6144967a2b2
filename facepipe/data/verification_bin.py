"""InsightFace verification `.bin` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

Each file is one pickle of `(bins, issame_list)`: 2*P encoded images (pair p = bins[2p], bins[2p+1])
and P bools. Writers in the wild pickled images as Python 2 `str`, Python 3 `bytes`, or numpy uint8
arrays (protocol 3 with `_reconstruct`, protocol 5 with `_frombuffer`). A pickle can run arbitrary code
through the globals it names, so loading goes through an unpickler that resolves only the handful of
numpy globals those formats need and refuses every other one before anything is called.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence

import numpy as np

from facepipe.errors import DataError
from facepipe.fsutil import write_bytes_atomic

__all__ = ["load_bin", "write_bin", "ALLOWED_GLOBALS", "RestrictedUnpickler"]


def _numpy_core(module: str, name: str):
    """Resolve a numpy.core.* global on numpy 1.x and 2.x (where it moved to numpy._core)."""
    import importlib

    for candidate in (module.replace("numpy.core", "numpy._core", 1), module):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"{module}.{name} is not available in this numpy")


# (module, name) pairs the four known `.bin` variants need, for numpy 1.x and 2.x spellings.
ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_core("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_core("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_core("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_core("numpy.core.numeric", "_frombuffer"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only resolves ALLOWED_GLOBALS; anything else raises before it can run."""

    def find_class(self, module: str, name: str):
        factory = ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return factory()

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id")


def _restricted_load(data: bytes, encoding: str):
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """Load a verification `.bin`: (encoded images as bytes, issame per pair)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise DataError(f"cannot read verification file: {err.strerror}", path) from err
    try:
        try:
            obj = _restricted_load(data, "ASCII")
        except UnicodeDecodeError:
            # A Python 2 pickle of `str` images: keep them as bytes, as InsightFace's load_bin does.
            obj = _restricted_load(data, "bytes")
    except pickle.UnpicklingError as err:
        raise DataError(f"unsafe or invalid pickle: {err}", path) from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError) as err:
        raise DataError(f"not a readable pickle: {type(err).__name__}: {err}", path) from None
    return _check_contents(obj, path)


def _check_contents(obj, path: str) -> tuple[list[bytes], list[bool]]:
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise DataError("expected a pickled (bins, issame_list) pair", path)
    bins, issame = obj
    if isinstance(issame, np.ndarray):
        issame = issame.tolist()
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise DataError("bins and issame_list must be lists", path)
    if len(bins) != 2 * len(issame):
        raise DataError(f"{len(bins)} images for {len(issame)} pairs (expected twice as many)", path)
    images: list[bytes] = []
    for i, item in enumerate(bins):
        if isinstance(item, (bytes, bytearray)):
            images.append(bytes(item))
        elif (
            isinstance(item, np.ndarray)
            and item.dtype == np.uint8
            and (item.ndim == 1 or item.shape[1:] == (1,))
        ):
            images.append(item.tobytes())
        else:
            raise DataError(f"image {i} is a {type(item).__name__}, not encoded image bytes", path, i)
    flags: list[bool] = []
    for p, value in enumerate(issame):
        if not isinstance(value, (bool, np.bool_)):
            raise DataError(f"issame value of pair {p} is {type(value).__name__}, not bool", path, p)
        flags.append(bool(value))
    return images, flags


def write_bin(
    path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool], protocol: int = 4
) -> None:
    """Write a verification `.bin` InsightFace's loader reads: pickle of (list of bytes, list of bool)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (expected twice as many)")
    if protocol < 3:
        # Python 3 writes bytes at protocol <= 2 via _codecs.encode, which the restricted loader refuses.
        raise ValueError("write_bin needs pickle protocol 3 or higher")
    payload = ([bytes(image) for image in images], [bool(flag) for flag in issame])
    write_bytes_atomic(path, pickle.dumps(payload, protocol=protocol))
