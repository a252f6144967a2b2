"""Writing training shards: rows into `OUT/<prefix>-NNNNN.parquet` files of bounded size, each written to a
temporary name and renamed when complete (nothing half-written looks like a shard)."""

from __future__ import annotations

import base64
import contextlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facepipe.data.decode.hashing import AppendHasher
from facepipe.data.shards import (
    DEFAULT_ROW_GROUP_BYTES,
    TRAIN_SCHEMA,
    _writer_options,
    binary_lengths,
    conform,
)
from facepipe.fsutil import atomic_path


def _as_views(schema: pa.Schema) -> pa.Schema:
    """`schema` with its binary fields as binary views, and without metadata (see `ShardWriter`)."""
    fields = [f.with_type(pa.binary_view()) if f.type == pa.binary() else f for f in schema]
    return pa.schema(fields)


def _arrow_schema_metadata(schema: pa.Schema) -> dict[bytes, bytes]:
    """The footer metadata Arrow writes for `schema` (its own metadata, then `ARROW:schema`: the
    base64 IPC serialisation that readers take column types from)."""
    metadata = dict(schema.metadata or {})
    metadata[b"ARROW:schema"] = base64.b64encode(schema.serialize().to_pybytes())
    return metadata


class ShardWriter:
    """Write rows into `OUT/<prefix>-NNNNN.parquet` files of about `target_bytes` image bytes each.

    Every file is written under a temporary name and renamed into place by `close()` (or when it rolls
    over to the next file). `close()` returns one dict per file: path, rows, bytes, sha256.

    Binary columns go to the Parquet writer as binary views (a binary column is viewed, not copied), so
    a caller can hand over payloads where they lie, e.g. in a memory-mapped `.rec`, and the writer
    copies each once into its page. Parquet stores both types alike; the schema in the footer is
    `schema`'s, written as Arrow would, so the file is byte for byte what writing `schema` gives.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "part",
        target_bytes: int = 256 << 20,
        row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
        start_index: int = 0,
        schema: pa.Schema = TRAIN_SCHEMA,
        size_column: str = "image",
    ):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.target_bytes = int(target_bytes)
        self.row_group_bytes = max(1, int(row_group_bytes))
        self.schema = schema
        self._file_schema = _as_views(schema)
        self.size_column = size_column
        self._index = start_index
        self._stack: contextlib.ExitStack | None = None
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._hasher: AppendHasher | None = None
        self._rows = 0
        self._bytes = 0
        self._final: Path | None = None
        self.written: list[dict] = []

    def begin(self) -> None:
        """Open the next file now instead of at the first write (a writer thread can do it while the
        first rows are still being prepared)."""
        if self._writer is None:
            self._open()

    def _open(self) -> None:
        self._final = self.out_dir / f"{self.prefix}-{self._index:05d}.parquet"
        self._index += 1
        self._stack = contextlib.ExitStack()
        # fsync'd by atomic_path before the rename: a renamed shard is a complete shard
        self._tmp = self._stack.enter_context(atomic_path(self._final))
        try:
            # Arrow writes the file itself (no Python in the write path, no copies into Python bytes);
            # a thread hashes what is already written from the page cache, one row group behind.
            self._writer = pq.ParquetWriter(
                str(self._tmp), self._file_schema, store_schema=False, **_writer_options(self.schema)
            )
            self._hasher = AppendHasher(self._tmp)
        except BaseException as err:  # e.g. a full disk on the first bytes: remove the temp file
            if self._writer is not None:
                with contextlib.suppress(Exception):
                    self._writer.close()
            self._stack.__exit__(type(err), err, err.__traceback__)
            self._stack = self._writer = None
            raise
        self._rows = self._bytes = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        try:
            self._writer.add_key_value_metadata(_arrow_schema_metadata(self.schema))
            self._writer.close()
            size = self._tmp.stat().st_size
            digest = self._hasher.finish(size)
            self._hasher = None
        except BaseException:
            self.abort()
            raise
        self._stack.close()  # fsyncs and renames the temporary file into place
        self.written.append({"path": str(self._final), "rows": self._rows, "bytes": size, "sha256": digest})
        self._writer = self._stack = None

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        table = conform(data, self._file_schema)
        if table.num_rows == 0:
            return
        cum = np.cumsum(binary_lengths(table[self.size_column]))
        start = 0
        while start < table.num_rows:
            if self._writer is None:
                self._open()
            # Rows that fit the current row group and the current file (at least one row always goes).
            room = min(self.row_group_bytes, max(self.target_bytes - self._bytes, 1))
            before = int(cum[start - 1]) if start else 0
            count = max(1, int(np.searchsorted(cum, before + room, side="right")) - start)
            piece = table.slice(start, count)
            self._writer.write_table(piece, row_group_size=count)
            self._hasher.advance(self._tmp.stat().st_size)
            self._rows += count
            self._bytes += int(cum[start + count - 1]) - before
            start += count
            if self._bytes >= self.target_bytes:
                self._finish()

    def close(self, keep_empty: bool = False) -> list[dict]:
        """Finish the current file; with `keep_empty`, write an empty shard if no row ever came."""
        if keep_empty and self._writer is None and not self.written:
            self._open()
        self._finish()
        return self.written

    def abort(self) -> None:
        """Drop the file being written (its temporary file is removed)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            if self._hasher is not None:
                self._hasher.cancel()
                self._hasher = None
            with contextlib.suppress(BaseException):
                self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._writer = self._stack = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
