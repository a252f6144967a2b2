"""Small collectives for training workers that also work outside a process group (one worker)."""

from __future__ import annotations

from typing import Any


def all_agree(flags: list[float]) -> list[float]:
    """Sum small per-rank flags over the process group (so every rank takes the same decision)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(flags, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; just `[obj]` outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
