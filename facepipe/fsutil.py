"""Filesystem helpers: atomic writes and checksums.

Writers never leave a half-written file under its final name: they write to a temporary file in the
same directory (so the rename is atomic on POSIX) and rename it into place only once it is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; a finished file gets the permissions a plain open() would give it
    os.chmod(tmp_path, 0o666 & ~_current_umask())
    try:
        yield tmp_path
        if fsync and tmp_path.exists():
            with open(tmp_path, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj)` to `path` atomically (torch is imported here only: it is heavy)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, Paths: common in metrics dictionaries
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def clean_stale_temps(directory: str | os.PathLike) -> int:
    """Remove temporary files left by an interrupted writer; returns how many were removed."""
    removed = 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    for tmp in directory.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed += 1
    return removed


def escape_name(name: str | bytes) -> str:
    """A file or folder name as strict UTF-8 text that keeps the original bytes: every backslash doubled
    and every byte that is not UTF-8 written `\\xNN` (Python reads such names with surrogate escapes,
    which strict JSON readers and Arrow refuse). `unescape_name` gives the bytes back."""
    raw = os.fsencode(name)
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def unescape_name(text: str) -> bytes:
    """The original bytes of a name written by `escape_name`."""
    import codecs

    return codecs.escape_decode(text.encode("utf-8"))[0]


def absolute_tracking_uri(uri: str | None, base: str | os.PathLike | None = None) -> str | None:
    """An MLflow tracking URI with a relative local store made absolute against `base` (default: the
    current directory): Ray Train workers and flow processes run in other directories, where
    `sqlite:///mlflow.db` or a plain `mlruns` folder would open a different, empty store."""
    if not uri:
        return uri
    root = Path(base) if base is not None else Path.cwd()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path, sep, query = uri[len(prefix) :].partition("?")
        if path and path != ":memory:":
            return prefix + str((root / path).resolve()) + sep + query
        return uri
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return (root / uri[len("file:") :]).resolve().as_uri()
    if ":" not in uri and uri != "databricks":  # a plain folder
        return str((root / uri).resolve())
    return uri
