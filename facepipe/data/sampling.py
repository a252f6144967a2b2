"""Batch plans over windows of row groups: P classes × K images, or plain shuffled batches.

Shards are label-sorted, so a *window* of consecutive row groups holds whole classes and a batch is read
from a bounded set of row groups (memory stays flat as the dataset grows). A plan depends only on
(seed, epoch, rank, world size, metadata), so a resumed run continues at the exact batch. Used by the
head stage (P×K for pair losses, plain for centre losses) and by fine-tuning.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def unit_labels(units: list[Any]) -> list[np.ndarray]:
    """The label column of every row group (small: 8 bytes a row)."""
    import pyarrow.parquet as pq

    out = []
    handles: dict[str, Any] = {}
    for unit in units:
        handle = handles.setdefault(unit.path, pq.ParquetFile(unit.path))
        out.append(handle.read_row_group(unit.row_group, columns=["label"]).column("label").to_numpy())
    return out


def windows(units: list[Any], window_rows: int) -> list[list[int]]:
    """Consecutive unit indices grouped into windows of at least `window_rows` rows."""
    groups, current, rows = [], [], 0
    for i, unit in enumerate(units):
        current.append(i)
        rows += unit.rows
        if rows >= window_rows:
            groups.append(current)
            current, rows = [], 0
    if current:
        groups.append(current)
    return groups


def _window_batches(
    labels: list[np.ndarray],
    window: list[int],
    rng: np.random.Generator,
    pk: tuple[int, int] | None,
    batch_size: int,
) -> list[np.ndarray]:
    """Batches of (unit, row) pairs from one window: P×K by class, or plain shuffled batches."""
    unit_ids = np.concatenate([np.full(len(labels[u]), u) for u in window])
    rows = np.concatenate([np.arange(len(labels[u])) for u in window])
    lab = np.concatenate([labels[u] for u in window])
    pairs = np.stack([unit_ids, rows], axis=1)
    if pk is None:
        perm = rng.permutation(len(lab))
        return [pairs[perm[i : i + batch_size]] for i in range(0, len(perm) - batch_size + 1, batch_size)]
    p, k = pk
    chunks = []
    order = np.argsort(lab, kind="stable")
    bounds = np.flatnonzero(np.diff(lab[order])) + 1
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue  # a class with one image has no genuine pair
        members = rng.permutation(members)
        if len(members) < k:
            members = np.concatenate([members, rng.choice(members, k - len(members))])
        for i in range(0, len(members) - k + 1, k):
            chunks.append(members[i : i + k])
    chunk_order = rng.permutation(len(chunks))
    batches = []
    for i in range(0, len(chunk_order) - p + 1, p):
        batches.append(pairs[np.concatenate([chunks[c] for c in chunk_order[i : i + p]])])
    return batches


def epoch_plan(
    labels: list[np.ndarray],
    groups: list[list[int]],
    epoch: int,
    seed: int,
    rank: int,
    world: int,
    pk: tuple[int, int] | None,
    batch_size: int,
) -> list[np.ndarray]:
    """This rank's batches for `epoch`: windows dealt round-robin in a seeded order, equal counts."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(groups))
    per_rank: list[list[np.ndarray]] = [[] for _ in range(world)]
    for i, g in enumerate(order):
        wrng = np.random.default_rng([seed, epoch, int(g)])
        per_rank[i % world].extend(_window_batches(labels, groups[g], wrng, pk, batch_size))
    steps = min(len(b) for b in per_rank)
    mine = per_rank[rank][:steps]
    np.random.default_rng([seed, epoch, 10_000 + rank]).shuffle(mine)
    return mine
