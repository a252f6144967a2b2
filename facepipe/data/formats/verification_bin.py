"""InsightFace verification `.bin` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

Each file is one pickle of `(bins, issame_list)`: 2*P encoded images (pair p = bins[2p], bins[2p+1])
and P bools. Writers in the wild pickled images as Python 2 `str`, Python 3 `bytes`, or numpy uint8
arrays (protocol 3 with `_reconstruct`, protocol 5 with `_frombuffer`). A pickle can run arbitrary code
through the globals it names, so loading goes through an unpickler that resolves only the handful of
numpy globals those formats need and refuses every other one before anything is called.
"""

from __future__ import annotations

import io
import math
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


def _element_count(shape) -> int:
    """Elements of a declared shape, in Python ints (no overflow), checked before anything is built."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        raise pickle.UnpicklingError(f"array shape {shape!r} is not a tuple of non-negative integers")
    return math.prod(dims)


def _backed_ndarray(shape, dtype=float, buffer=None, offset=0, strides=None, order=None):
    """`numpy.ndarray(...)` as a pickle may call it: only over a buffer of the pickle's bytes (numpy checks
    its size). Without one the array would hold whatever was in the process's memory: refused."""
    if buffer is None and _element_count(shape):
        raise pickle.UnpicklingError(
            f"an array of shape {tuple(shape) if not isinstance(shape, int) else (shape,)} is declared "
            "without its data (it would expose uninitialised memory)"
        )
    return np.ndarray(shape, dtype, buffer, offset, strides, order)


def _empty_reconstruct(subtype, shape, dtype):
    """numpy's `_reconstruct` builds an uninitialised array that the pickle's BUILD then fills from its
    bytes (numpy checks that their size matches). numpy itself always pickles shape (0,): refuse any
    other, which would stay uninitialised when the pickle leaves out the BUILD."""
    if subtype not in (np.ndarray, _backed_ndarray):
        raise pickle.UnpicklingError(f"refusing to reconstruct a {subtype!r}")
    if _element_count(shape):
        raise pickle.UnpicklingError(
            f"an array of shape {tuple(shape)} is declared before its data (it would expose uninitialised "
            "memory when the data does not follow)"
        )
    return _numpy_core("numpy.core.multiarray", "_reconstruct")(np.ndarray, shape, dtype)


# (module, name) pairs the four known `.bin` variants need, for numpy 1.x and 2.x spellings. Arrays are
# only ever built over bytes the pickle holds (see _backed_ndarray, _empty_reconstruct).
ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): lambda: _backed_ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _empty_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _empty_reconstruct,
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
    except (
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        MemoryError,
        OverflowError,
    ) as err:
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
