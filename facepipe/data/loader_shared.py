"""Batch memory shared with the loader's decode processes, so decoded pixels cross no pipe.

In process mode an epoch gets one shared-memory block of a few batch slots. A decode process maps
the block once, decodes its batch into the slot it was given and sends back only the labels; the
loader copies the slot into the batch it hands out (pinned when CUDA is present) and gives the slot
to a later batch. Sending the pixels through the pool's pipe instead costs a pickle, a pipe
transfer and an unpickle of about 5 MB per batch, which on two cores takes a visible share of the
decoders' CPU (bench/loader.py's `process_mode_*` fields).

The block is multiprocessing's `SharedMemory`: when the training process is killed, its decode
processes die with it (`worker_pool.die_with_parent`) and multiprocessing's resource tracker, which
they share, unlinks the block, so nothing is left in /dev/shm.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
from multiprocessing import shared_memory

import numpy as np

from facepipe.errors import FacepipeError

__all__ = ["SharedSlots", "slot_view"]

SHM_DIR = "/dev/shm"


class SharedSlots:
    """`slots` uint8 arrays of `shape` in one shared block; `take` a free one, `give` it back."""

    def __init__(self, slots: int, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.slot_bytes = int(np.prod(self.shape))
        size = max(int(slots), 1) * self.slot_bytes
        with contextlib.suppress(OSError):  # no /dev/shm to ask: let the allocation speak
            free = shutil.disk_usage(SHM_DIR).free
            if free < 2 * size:  # a full tmpfs fails with SIGBUS on write, not with an error
                raise FacepipeError(
                    f"the process-mode loader needs {size / 2**20:.0f} MB of shared memory and {SHM_DIR} "
                    f"has {free / 2**20:.0f} MB free: set loader.mode=thread, or give the container "
                    "more shared memory (docker --shm-size, a Kubernetes emptyDir with medium Memory)"
                )
        self.block = shared_memory.SharedMemory(create=True, size=size)
        self.name = self.block.name
        self._free = collections.deque(range(max(int(slots), 1)))

    def take(self) -> int:
        if not self._free:
            raise FacepipeError("no free batch slot: more batches in flight than the loader allocated")
        return self._free.popleft()

    def give(self, slot: int) -> None:
        self._free.append(slot)

    def view(self, slot: int) -> np.ndarray:
        return np.ndarray(self.shape, np.uint8, buffer=self.block.buf, offset=slot * self.slot_bytes)

    def close(self) -> None:
        self.block.close()
        with contextlib.suppress(FileNotFoundError):
            self.block.unlink()


_ATTACHED: dict[str, shared_memory.SharedMemory] = {}


def slot_view(name: str, slot: int, shape: tuple[int, ...]) -> np.ndarray:
    """In a decode process: slot `slot` of the block `name`, mapped on first use. A new name means a
    new epoch's block: the earlier one (unlinked by the loader) is unmapped."""
    block = _ATTACHED.get(name)
    if block is None:
        for old in _ATTACHED.values():
            with contextlib.suppress(BufferError):  # a view still alive: the mapping goes with it
                old.close()
        _ATTACHED.clear()
        block = _ATTACHED[name] = shared_memory.SharedMemory(name=name)
    return np.ndarray(shape, np.uint8, buffer=block.buf, offset=slot * int(np.prod(shape)))
