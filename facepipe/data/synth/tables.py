"""Parquet sidecars of the generated dataset (per-image and per-pair degradation and nuisance), written
in row batches so memory stays flat."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from facepipe.data.synth import render as sr

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- writing


class _ParquetRows:
    """Append dict rows to a Parquet file in row groups of `batch` rows (memory stays flat); the file
    appears under its final name only when the writer closes without error."""

    def __init__(self, path: Path, schema: Any, batch: int = 8192) -> None:
        from facepipe.fsutil import atomic_path

        self.schema, self.batch = schema, batch
        self._pending: list[dict[str, Any]] = []
        self._atomic = atomic_path(path)
        self._writer: Any = None

    def __enter__(self) -> _ParquetRows:
        import pyarrow.parquet as pq

        tmp = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(tmp, self.schema)
        return self

    def add(self, row: dict[str, Any]) -> None:
        self._pending.append(row)
        if len(self._pending) >= self.batch:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._pending:
            self._writer.write_table(pa.Table.from_pylist(self._pending, schema=self.schema))
            self._pending = []

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                self._flush()
        finally:
            self._writer.close()
            self._atomic.__exit__(*exc)


def _write_parquet(path: Path, rows: list[dict[str, Any]], schema: Any) -> None:
    with _ParquetRows(path, schema) as out:
        for row in rows:
            out.add(row)


def _train_schema() -> Any:
    """key, label, degradation, then every other nuisance parameter (ints as int64, the rest float32)."""
    import pyarrow as pa

    ints = ("occlusions", "jpeg_quality", "seed")
    fields = [
        pa.field("key", pa.int64()),
        pa.field("label", pa.int64()),
        pa.field("degradation", pa.float32()),
    ]
    for name in sr.Nuisance.__dataclass_fields__:
        if name != "degradation":
            fields.append(pa.field(name, pa.int64() if name in ints else pa.float32()))
    return pa.schema(fields)


def _pair_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("pair", pa.int64()),
            ("issame", pa.bool_()),
            ("degradation_a", pa.float32()),
            ("degradation_b", pa.float32()),
            ("identity_a", pa.int64()),
            ("identity_b", pa.int64()),
            ("hard_negative", pa.bool_()),
            ("redrawn", pa.string()),  # groups the relative re-drew (hard negatives only)
            ("kind", pa.string()),  # clean / mixed / degraded: the pair type drawn
        ]
    )
