"""The loader's decoding work: what runs in its pool threads or processes.

A thread-mode task (`decode_batch`) decodes one batch from the row groups the epoch's reader
(`loader_read.ReadAhead`) fetched; process mode and the fine-tuning / feature callers use
`decode_rows`, which reads row groups itself through a small per-process cache. Both end in one
`decode_many` call per run of row groups (`facepipe.data.formats.decode_into`). Nothing heavy is
imported at module level: process-mode workers import this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from facepipe.data.formats.decode_into import decode_many
from facepipe.data.loader_plan import Unit
from facepipe.data.loader_read import BinaryColumn, ReadAhead, cached_group
from facepipe.data.loader_shared import slot_view
from facepipe.errors import DataError, FacepipeError

__all__ = ["decode_batch", "decode_rows", "decode_to_slot"]


def _decode_pieces(
    pieces: Sequence[tuple[BinaryColumn, np.ndarray, Unit]], flips: np.ndarray, rgb: bool, out: np.ndarray
) -> None:
    """Decode a batch, given as (row group's column, its rows, the group) in batch order, into `out`
    (uint8 NHWC), flipped where `flips`: one `decode_many` call for all its row groups."""
    spans = [column.spans(rows) for column, rows, _ in pieces]
    counts = [len(rows) for _, rows, _ in pieces]
    which = np.repeat(np.arange(len(pieces)), counts)
    starts = np.concatenate([a for a, _ in spans]) if spans else np.zeros(0, np.int64)
    ends = np.concatenate([b for _, b in spans]) if spans else np.zeros(0, np.int64)
    failed = decode_many([column.data for column, _, _ in pieces], which, starts, ends, flips, out, rgb)
    if failed is not None:
        k, problem = failed
        column, rows, unit = pieces[which[k]]
        row = rows[k - sum(counts[: which[k]])]
        raise DataError(problem, path=unit.path, record=f"row group {unit.row_group}, row {row}")


def decode_rows(
    pieces: Sequence[tuple[str, int, np.ndarray]],
    flips: np.ndarray,
    size: tuple[int, int],
    color_order: str,
    cache_groups: int = 4,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the rows named by `pieces` ((shard, row group, row indices) in batch order).

    Returns uint8 NHWC images resized to `size` (height, width) in `color_order`, horizontally flipped
    where `flips` is true, and int64 labels. The images are written into `out` when given (e.g. a
    pinned batch buffer), else into one array allocated here. A row that does not decode raises
    `DataError` naming the shard and the row.
    """
    height, width = size
    total = sum(len(rows) for _, _, rows in pieces)
    shape = (total, height, width, 3)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise FacepipeError(f"batch buffer is {out.dtype} {out.shape}, decoding needs uint8 {shape}")
    labels = np.empty(total, dtype=np.int64)
    columns, i = [], 0
    for path, rg, rows in pieces:
        column, label_values = cached_group(path, rg, cache_groups)
        rows = np.asarray(rows, dtype=np.int64)
        labels[i : i + len(rows)] = label_values[rows]
        columns.append((column, rows, Unit(path, rg, 0)))
        i += len(rows)
    _decode_pieces(columns, np.asarray(flips, dtype=bool), color_order == "RGB", out)
    return out, labels


def decode_to_slot(
    block: str, slot: int, pieces: list, flips: np.ndarray, size: tuple[int, int], order: str, cache: int
) -> np.ndarray:
    """A process-mode task: decode a batch into its slot of the shared block; only the labels go back."""
    out = slot_view(block, slot, (len(flips), *size, 3))
    return decode_rows(pieces, flips, size, order, cache, out)[1]


def decode_batch(
    reads: ReadAhead,
    groups: list[tuple[int, np.ndarray]],
    flips: np.ndarray,
    rgb: bool,
    out: np.ndarray,
    labels: np.ndarray,
) -> None:
    """One pool task: a whole batch (per-task hand-off costs are paid once per batch, not per image).

    Its row groups are decoded in runs: a run starts at the next group (waiting for it) and takes the
    ones after it that are already read. Mid-epoch that is the whole batch in one C call; at an
    epoch's start the decoding follows the reader instead of waiting for its last group."""
    bounds = np.cumsum([0, *(len(rows) for _, rows in groups)])
    start = 0
    while start < len(groups):
        columns = []
        for g in range(start, len(groups)):
            unit, rows = groups[g]
            if g > start and not reads.ready(unit):
                break
            column, label_values = reads.get(unit)
            labels[bounds[g] : bounds[g + 1]] = label_values[rows]
            columns.append((column, rows, reads.units[unit]))
        run = slice(bounds[start], bounds[start + len(columns)])
        _decode_pieces(columns, flips[run], rgb, out[run])
        start += len(columns)
    reads.release([unit for unit, _ in groups])
