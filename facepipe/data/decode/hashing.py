"""File hashes straight from a memory mapping (no copy out of the page cache, flat memory), and the
shard hasher that follows a file while it is written.

Source files are fingerprinted with a choice of algorithm: xxh3-128 by default (not cryptographic, but
ample to tell a changed or damaged input, at ~6x the speed of sha256 even with SHA-NI: sha256 of the
sources was about a quarter of a conversion's CPU), or sha256 where a cryptographic digest is wanted.
Shards are always hashed with sha256.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import threading

from facepipe.errors import DataError

__all__ = [
    "DEFAULT_SOURCE_HASH",
    "SOURCE_HASHES",
    "AppendHasher",
    "check_source_hash",
    "hash_mapped",
    "new_hash",
    "sha256_mapped",
    "update_from_mapping",
]

SOURCE_HASHES = ("xxh3_128", "sha256")
DEFAULT_SOURCE_HASH = "xxh3_128"


def check_source_hash(algorithm: str) -> str:
    """`algorithm` if it is one of SOURCE_HASHES, else a DataError naming the choices."""
    if algorithm not in SOURCE_HASHES:
        raise DataError(f"unknown source hash {algorithm!r}: choose one of {', '.join(SOURCE_HASHES)}")
    return algorithm


def new_hash(algorithm: str):
    """A fresh hash object (`update`, `hexdigest`) for one of SOURCE_HASHES."""
    if check_source_hash(algorithm) == "sha256":
        return hashlib.sha256()
    import xxhash

    return xxhash.xxh3_128()


def hash_mapped(
    path: str | os.PathLike,
    algorithm: str = "sha256",
    stop: threading.Event | None = None,
    window: int = 2 << 20,
) -> str | None:
    """Hex digest of the file, hashed one mapped `window` at a time, each window dropped from this
    process after use (so resident memory stays at one window); None if `stop` was set midway."""
    digest = new_hash(algorithm)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return digest.hexdigest()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if not update_from_mapping(digest, mm, 0, size, window, stop):
                return None
    return digest.hexdigest()


def update_from_mapping(
    digest, mm: mmap.mmap, start: int, end: int, window: int = 2 << 20, stop: threading.Event | None = None
) -> bool:
    """Feed the mapping's bytes [start, end) to `digest` a window at a time, dropping each window's pages
    from this process after use; False if `stop` was set midway."""
    for lo in range(start, end, window):
        if stop is not None and stop.is_set():
            return False
        hi = min(lo + window, end)
        aligned = lo - lo % mmap.PAGESIZE  # madvise takes page-aligned starts
        mm.madvise(mmap.MADV_WILLNEED, aligned, hi - aligned)
        with memoryview(mm)[lo:hi] as view:
            digest.update(view)  # hashlib and xxhash both release the GIL here
        mm.madvise(mmap.MADV_DONTNEED, aligned, hi - aligned)
    return True


def sha256_mapped(
    path: str | os.PathLike, stop: threading.Event | None = None, window: int = 2 << 20
) -> str | None:
    """`hash_mapped` with sha256."""
    return hash_mapped(path, "sha256", stop, window)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, don't wait for it


@functools.cache
def _sync_file_range():
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # not Linux (TypeError: Windows has no CDLL(None))
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this stretch of the file to disk now, without waiting.

    A later fsync then waits only for what was written since, instead of the whole file at once: the
    disk works while the CPU converts the next row groups. Best effort: a no-op where unsupported.
    """
    function = _sync_file_range()
    if function is not None and length > 0:
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class AppendHasher(threading.Thread):
    """sha256 of a file that another writer only appends to, hashed a step behind it.

    The writer calls `advance(size)` whenever it has written up to `size` bytes (bytes before that are
    final: Parquet never seeks back); this thread hashes the new stretch from the page cache through a
    mapping, overlapping with the writer encoding what comes next, then (with `writeback`) starts that
    stretch's writeback to disk, so the writer's closing fsync has little left to wait for.
    `finish(size)` returns the digest.
    """

    def __init__(self, path: str | os.PathLike, window: int = 4 << 20, writeback: bool = True):
        super().__init__(name="shard-hasher", daemon=True)
        self._fd = os.open(path, os.O_RDONLY)
        self._window = window
        self._writeback = writeback
        self._digest = hashlib.sha256()
        self._hashed = 0
        self._target = 0
        self._final = False
        self._cancelled = False
        self._error: BaseException | None = None
        self._wake = threading.Condition()
        self.start()

    def advance(self, size: int, final: bool = False) -> None:
        with self._wake:
            self._target = max(self._target, size)
            self._final = self._final or final
            self._wake.notify()

    def run(self) -> None:
        try:
            while True:
                with self._wake:
                    while self._target <= self._hashed and not (self._final or self._cancelled):
                        self._wake.wait()
                    if self._cancelled or (self._final and self._target <= self._hashed):
                        return
                    target = self._target
                self._hash_until(target)
        except BaseException as err:  # noqa: BLE001 - re-raised by finish()
            self._error = err

    def _hash_until(self, end: int) -> None:
        while self._hashed < end:
            start = self._hashed
            base = start - start % mmap.ALLOCATIONGRANULARITY  # mapping offsets must be aligned
            stop = min(end, start + self._window)
            mm = mmap.mmap(self._fd, stop - base, access=mmap.ACCESS_READ, offset=base)
            with mm, memoryview(mm)[start - base :] as view:
                self._digest.update(view)  # releases the GIL
            if self._writeback:
                start_writeback(self._fd, start, stop - start)
            self._hashed = stop

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def finish(self, size: int) -> str:
        """Hash up to `size` (the complete file) and return the hex digest."""
        self.advance(size, final=True)
        self.join()
        self._close_fd()
        if self._error is not None:
            raise self._error
        if self._hashed != size:
            raise OSError(f"hashed {self._hashed} of {size} bytes")
        return self._digest.hexdigest()

    def cancel(self) -> None:
        with self._wake:
            self._cancelled = True
            self._wake.notify()
        self.join()
        self._close_fd()
