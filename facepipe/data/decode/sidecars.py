"""Optional degradation sidecars that `facepipe synth` writes beside its sources.

- `<any>.parquet` beside the `.rec` with columns `key`, `degradation`: one value per image key;
- `<name>.degradation.parquet` beside `<name>.bin` with `degradation_a`, `degradation_b`: one row per pair.

Real datasets have neither; they decode with null degradation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

__all__ = ["load_key_degradation", "lookup_degradation", "load_pair_degradation", "pair_sidecar_path"]

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("degradation_a", "degradation_b")


def _read_columns(path: Path, names: list[str], dtypes: list, warn: bool) -> dict[str, np.ndarray] | None:
    """The named columns as numpy arrays, or None if the file lacks one of them or is no Parquet."""
    import pyarrow.parquet as pq

    from facepipe.data.shards import column_to_numpy

    try:
        if not set(names) <= set(pq.read_schema(path).names):
            return None
        table = pq.read_table(path, columns=names)
    except Exception as err:  # noqa: BLE001 - an unreadable optional sidecar is reported, not fatal
        if warn:
            log.warning("ignoring unreadable sidecar %s: %s", path, err)
        return None
    return {name: column_to_numpy(table[name], dtype) for name, dtype in zip(names, dtypes, strict=True)}


def load_key_degradation(rec_path: Path) -> dict | None:
    """Per-key degradation from the first Parquet beside the `.rec` that has `key` and `degradation`:
    {"path", "keys" (sorted), "values"}."""
    for path in sorted(rec_path.parent.glob("*.parquet")):
        columns = _read_columns(path, ["key", "degradation"], [np.int64, np.float32], warn=False)
        if columns is not None:
            order = np.argsort(columns["key"])
            return {"path": path, "keys": columns["key"][order], "values": columns["degradation"][order]}
    return None


def lookup_degradation(sidecar: dict, keys: np.ndarray) -> np.ndarray:
    """Degradation of each key (NaN where the sidecar has none)."""
    known = sidecar["keys"]
    if len(known) == 0:
        return np.full(len(keys), np.nan, np.float32)
    pos = np.minimum(np.searchsorted(known, keys), len(known) - 1)
    return np.where(known[pos] == keys, sidecar["values"][pos], np.nan).astype(np.float32)


def pair_sidecar_path(bin_path: Path) -> Path:
    return bin_path.with_suffix(".degradation.parquet")


def load_pair_degradation(bin_path: Path, n_pairs: int) -> dict[str, np.ndarray]:
    """degradation_a/b per pair from the `.bin`'s sidecar when it has one row per pair, else {}."""
    sidecar = pair_sidecar_path(bin_path)
    if not sidecar.is_file():
        return {}
    columns = _read_columns(sidecar, list(PAIR_COLUMNS), [np.float32, np.float32], warn=True)
    if columns is None:
        return {}
    rows = len(columns[PAIR_COLUMNS[0]])
    if rows != n_pairs:
        log.warning("ignoring %s: %d rows for %d pairs", sidecar, rows, n_pairs)
        return {}
    return columns
