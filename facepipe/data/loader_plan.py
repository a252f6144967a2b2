"""The loader's arithmetic: an epoch's sample order per rank, batches grouped by row group, pool size.

Pure functions of Parquet metadata and seeds (no I/O), so every rank and every restart computes the
same plan and resuming at batch k of an epoch decodes nothing before it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from facepipe.cores import available_cores


@dataclass(frozen=True)
class Unit:
    """One row group of one shard: the smallest piece the loader reads."""

    path: str
    row_group: int
    rows: int


def epoch_plan(
    units: Sequence[Unit],
    seed: int,
    epoch: int,
    lo: int,
    hi: int,
    shuffle: bool,
    window_rows: int,
    flip: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit index, row, flip) per sample of the rows `[lo, hi)` of the epoch's unit order.

    Units are put in a seeded, epoch-dependent order; each rank takes its contiguous slice `[lo, hi)`
    of that order's rows; rows are block-shuffled inside windows of `window_rows` so a batch mixes
    many identities even though shards are written in label order.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(units)) if shuffle else np.arange(len(units))
    sizes = np.array([units[i].rows for i in order], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    unit_ids, rows = [], []
    first = int(np.searchsorted(starts, lo, side="right") - 1)
    for k in range(first, len(order)):
        a, b = starts[k], starts[k + 1]
        if a >= hi:
            break
        # each unit's rows in a unit-specific random order, then the part inside [lo, hi)
        # (seeded by the unit, so ranks sharing a unit agree on its order and split it exactly)
        if shuffle:
            unit_rows = np.random.default_rng([seed, epoch, int(order[k])]).permutation(int(sizes[k]))
        else:
            unit_rows = np.arange(int(sizes[k]))
        take = unit_rows[max(lo - a, 0) : min(hi, b) - a]
        unit_ids.append(np.full(len(take), order[k], dtype=np.int64))
        rows.append(take)
    unit_idx = np.concatenate(unit_ids)
    row_idx = np.concatenate(rows)
    if shuffle:
        # block shuffle: mix rows across the units that share a window (shards are label-sorted)
        perm = np.arange(len(unit_idx))
        for start in range(0, len(perm), window_rows):
            block = perm[start : start + window_rows]
            perm[start : start + window_rows] = rng.permutation(block)
        unit_idx, row_idx = unit_idx[perm], row_idx[perm]
    flips = rng.random(len(unit_idx)) < 0.5 if flip else np.zeros(len(unit_idx), dtype=bool)
    return unit_idx, row_idx, flips


def group_by_unit(
    unit_idx: np.ndarray, row_idx: np.ndarray
) -> tuple[list[tuple[int, np.ndarray]], np.ndarray]:
    """A batch's rows grouped per unit, keeping the batch order within a unit: ([(unit, rows)], order).

    `order` is the permutation of the batch the groups follow (flips must be reordered by it).
    """
    # stable sort by unit so rows of one row group are read together; order then follows units
    order = np.argsort(unit_idx, kind="stable")
    u_sorted, r_sorted = unit_idx[order], row_idx[order]
    bounds = (np.flatnonzero(u_sorted[1:] != u_sorted[:-1]) + 1).tolist()
    starts, ends = [0, *bounds], [*bounds, len(u_sorted)]
    groups = [(u, r_sorted[a:b]) for u, a, b in zip(u_sorted[starts].tolist(), starts, ends, strict=True)]
    return groups, order


def batch_pieces(
    units: Sequence[Unit], unit_idx: np.ndarray, row_idx: np.ndarray
) -> tuple[list[tuple[str, int, np.ndarray]], np.ndarray]:
    """`group_by_unit` with each unit named by (shard path, row group): the pieces `decode_rows` takes."""
    groups, order = group_by_unit(unit_idx, row_idx)
    return [(units[u].path, units[u].row_group, rows) for u, rows in groups], order


def read_schedule(unit_idx: np.ndarray, batch_size: int) -> tuple[list[tuple[int, int]], dict[int, int]]:
    """When the batches of `unit_idx` (batch k is `unit_idx[k*B:(k+1)*B]`) need each unit.

    Returns the units in order of first use as (unit, first batch), and the number of batches that
    use each unit (after that many, its rows can be dropped).
    """
    nb = max(len(unit_idx) // batch_size, 1)
    pairs = np.unique(unit_idx.astype(np.int64) * nb + np.arange(len(unit_idx)) // batch_size)
    ids, at, uses = np.unique(pairs // nb, return_index=True, return_counts=True)
    first = pairs[at] % nb  # pairs sort by unit, then batch: a unit's first pair is its first batch
    order = [(int(u), int(b)) for b, u in sorted(zip(first.tolist(), ids.tolist(), strict=True))]
    return order, dict(zip(ids.tolist(), uses.tolist(), strict=True))


def assigned_cores() -> int:
    """CPU cores this worker may use: Ray's assignment inside a Ray task/actor, else the affinity mask
    capped by the container's CPU quota (`facepipe.cores`)."""
    ray = sys.modules.get("ray")  # only a process that already runs Ray can be inside a Ray worker
    if ray is not None and ray.is_initialized():
        try:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        except Exception:  # noqa: BLE001 - a driver has no assignment; fall through to the mask
            cpus = None
        if cpus:
            return max(int(cpus), 1)
    return available_cores()


def decode_workers(requested: int | None) -> int:
    """Decode pool size: the cores this worker was given, capped by an explicit request.

    More decode threads than cores only adds contention with the training thread; None or 0 means
    "as many as the cores".
    """
    cores = assigned_cores()
    return cores if not requested else max(1, min(int(requested), cores))
