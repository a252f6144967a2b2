"""Parquet shards: the one training format, plus verification pair tables and the manifest.

A training shard holds one row per image with the encoded bytes exactly as they came (never re-encoded).
Row groups are bounded in bytes, so a reader streams a shard a row group at a time and no column chunk
comes near Parquet's/Arrow's 2 GiB limits. Files are written to a temporary name and renamed when
complete, so nothing half-written looks like a shard.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facepipe.data.decode_hashing import AppendHasher
from facepipe.data.image_header import DEFAULT_MAX_PIXELS, size_problem
from facepipe.errors import DataError
from facepipe.fsutil import atomic_path, write_json_atomic

__all__ = [
    "TRAIN_SCHEMA",
    "PAIR_SCHEMA",
    "REJECT_SCHEMA",
    "DECODE_REJECT_SCHEMA",
    "MANIFEST_NAME",
    "ShardWriter",
    "binary_lengths",
    "column_to_numpy",
    "conform",
    "write_manifest",
    "read_manifest",
    "write_pair_table",
    "read_pair_table",
    "pair_folds",
    "list_shards",
    "iter_shard_batches",
    "decode_images",
    "images_to_tensor",
]

MANIFEST_NAME = "manifest.json"
DEFAULT_ROW_GROUP_BYTES = 4 << 20

TRAIN_SCHEMA = pa.schema(
    [
        pa.field("key", pa.int64(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("landmarks", pa.list_(pa.float32())),  # 10 values: 5 (x, y) points, or null
        pa.field("det_score", pa.float32()),
        pa.field("source_path", pa.string()),
        pa.field("degradation", pa.float32()),
    ]
)

PAIR_SCHEMA = pa.schema(
    [
        pa.field("image_a", pa.binary(), nullable=False),
        pa.field("image_b", pa.binary(), nullable=False),
        pa.field("issame", pa.bool_(), nullable=False),
        pa.field("fold", pa.int32(), nullable=False),
        # per-image degradation when the source has a `<name>.degradation.parquet` sidecar (synthetic data)
        pa.field("degradation_a", pa.float32()),
        pa.field("degradation_b", pa.float32()),
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("key", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)
# decode's rejects also give where the record starts in its .rec (null for a .bin pair image, whose
# pickle has no per-image offsets): the byte offset in the file, never in a chunk
DECODE_REJECT_SCHEMA = REJECT_SCHEMA.append(pa.field("offset", pa.int64(), nullable=True))


def _writer_options(schema: pa.Schema) -> dict:
    names = set(schema.names)
    # JPEG bytes don't compress and their min/max statistics would copy whole images into the footer.
    return {
        "compression": "none",
        "use_dictionary": [n for n in ("dataset", "source_path") if n in names],
        "write_statistics": [n for n in ("key", "label", "det_score", "degradation", "fold") if n in names],
    }


def conform(data: pa.Table | pa.RecordBatch, schema: pa.Schema = TRAIN_SCHEMA) -> pa.Table:
    """Reorder/cast columns to `schema`, adding absent nullable columns as nulls."""
    table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
    present = set(table.column_names)
    columns = []
    for field in schema:
        if field.name in present:
            column = table[field.name]
            if column.type != field.type:
                column = column.cast(field.type)
            columns.append(column)
        elif field.nullable:
            columns.append(_nulls(table.num_rows, field.type))
        else:
            raise ValueError(f"shard data lacks the required column {field.name!r}")
    return pa.Table.from_arrays(columns, schema=schema)


_NULLS: dict[pa.DataType, pa.Array] = {}


def _nulls(n: int, type_: pa.DataType) -> pa.Array:
    """`n` nulls of `type_`: a slice of one cached array per type (every chunk of a conversion needs
    them; building them afresh each time was a tenth of the writer thread's own work)."""
    cached = _NULLS.get(type_)
    if cached is None or len(cached) < n:
        cached = _NULLS[type_] = pa.nulls(max(n, 4096), type_)
    return cached.slice(0, n)


def binary_lengths(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Byte length of each value of a (large_)binary/string(_view) column, read from its offsets (or
    views) buffer.

    (ChunkedArray.to_numpy would import pandas, a second of start-up in every worker.)
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [np.zeros(0, np.int64)]
    for chunk in chunks:
        if pa.types.is_binary_view(chunk.type) or pa.types.is_string_view(chunk.type):
            views = np.frombuffer(chunk.buffers()[1], dtype="<i4", count=4 * (chunk.offset + len(chunk)))
            parts.append(views[4 * chunk.offset :: 4].astype(np.int64))  # a view starts with its length
            continue
        wide = pa.types.is_large_binary(chunk.type) or pa.types.is_large_string(chunk.type)
        dtype = np.int64 if wide else np.int32
        itemsize = np.dtype(dtype).itemsize
        offsets = np.frombuffer(
            chunk.buffers()[1], dtype=dtype, count=len(chunk) + 1, offset=chunk.offset * itemsize
        )
        parts.append(np.diff(offsets).astype(np.int64))
    return np.concatenate(parts)


def column_to_numpy(column: pa.ChunkedArray | pa.Array, dtype) -> np.ndarray:
    """A numeric column as a numpy array (nulls → NaN for floats), without pyarrow's pandas import."""
    dtype = np.dtype(dtype)
    arrow_type = pa.from_numpy_dtype(dtype)
    column = pc.cast(column, arrow_type)
    if dtype.kind == "f":
        column = pc.fill_null(column, float("nan"))
    elif column.null_count:
        raise ValueError("integer column has nulls")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], arrow_type)
    data = np.frombuffer(column.buffers()[1], dtype=dtype, count=len(column) + column.offset)
    return data[column.offset :].copy()


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


# ------------------------------------------------------------------------------------------- manifest


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path


def read_manifest(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            "no manifest: not a decoded dataset (run `facepipe decode` first)", str(path)
        ) from None
    except json.JSONDecodeError as err:
        raise DataError(f"manifest is not valid JSON: {err}", str(path)) from None


# ---------------------------------------------------------------------------------------- pair tables


def pair_folds(n_pairs: int, n_folds: int = 10) -> np.ndarray:
    """InsightFace's 10-fold split of pairs in file order, exactly as `KFold(10, shuffle=False)` cuts it.

    KFold gives the first `n_pairs % n_folds` folds one extra pair, so for pair counts that are not a
    multiple of 10 this differs from `index * 10 // n_pairs`; evaluation must see the same folds.
    """
    sizes = np.full(n_folds, n_pairs // n_folds, dtype=np.int64)
    sizes[: n_pairs % n_folds] += 1
    return np.repeat(np.arange(n_folds, dtype=np.int32), sizes)


def write_pair_table(
    path: str | os.PathLike,
    images: Sequence[bytes],
    issame: Sequence[bool],
    row_group_bytes: int = 64 << 20,
    folds: Sequence[int] | None = None,
    extra: dict[str, Sequence] | None = None,
) -> dict:
    """Write a verification pair table (image_a, image_b, issame, fold) in file order; returns its entry.

    `folds` defaults to InsightFace's split (`pair_folds`); `extra` adds optional columns of
    PAIR_SCHEMA (degradation_a/b).
    """
    n = len(issame)
    if len(images) != 2 * n:
        raise ValueError(f"{len(images)} images for {n} pairs")
    columns = {
        "image_a": pa.array(images[0::2], pa.binary()),
        "image_b": pa.array(images[1::2], pa.binary()),
        "issame": pa.array(list(issame), pa.bool_()),
        "fold": pa.array(pair_folds(n) if folds is None else np.asarray(folds, np.int32), pa.int32()),
    }
    for name, values in (extra or {}).items():
        as_list = [None if v is None or v != v else float(v) for v in np.asarray(values, np.float64).tolist()]
        columns[name] = pa.array(as_list, PAIR_SCHEMA.field(name).type)  # NaN → null
    table = conform(pa.table(columns), PAIR_SCHEMA)
    sizes = np.array([len(a) + len(b) for a, b in zip(images[0::2], images[1::2], strict=True)], np.int64)
    rows_per_group = max(1, int(row_group_bytes // max(int(sizes.mean()) if n else 1, 1)))
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=rows_per_group, **_writer_options(PAIR_SCHEMA))
    from facepipe.fsutil import sha256_file

    return {"path": str(path), "pairs": n, "positives": int(sum(issame)), "sha256": sha256_file(path)}


def read_pair_table(path: str | os.PathLike) -> pa.Table:
    return pq.read_table(path, schema=PAIR_SCHEMA)


# --------------------------------------------------------------------------------------------- reading


def list_shards(directory: str | os.PathLike) -> list[Path]:
    """Training shards of a decoded dataset (OUT or OUT/train), in shard order; temp files excluded."""
    directory = Path(directory)
    if (directory / "train").is_dir():
        directory = directory / "train"
    return sorted(p for p in directory.glob("*.parquet") if not p.name.startswith("."))


def pair_tables(shards_dir: str | os.PathLike) -> dict[str, Path]:
    """name -> pair table of a decoded dataset (OUT/pairs/<name>.parquet)."""
    folder = Path(shards_dir) / "pairs"
    return {p.stem: p for p in sorted(folder.glob("*.parquet")) if not p.name.startswith(".")}


def iter_shard_batches(
    paths: Iterable[str | os.PathLike], columns: Sequence[str] | None = None, batch_rows: int = 1024
) -> Iterator[pa.RecordBatch]:
    """Stream RecordBatches of at most `batch_rows` rows from shards, one row group at a time."""
    for path in paths:
        try:
            handle = pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"not a readable Parquet shard: {err}", str(path)) from None
        with handle:
            yield from handle.iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None)


def decode_images(
    images: Sequence[bytes] | pa.Array | pa.ChunkedArray,
    color_order: str = "RGB",
    size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode encoded images into one uint8 array of shape (N, H, W, 3) in the requested colour order.

    `size` = (height, width) resizes images that differ; without it all images must share one shape.
    An image whose header declares more than `max_pixels` is refused before it is decoded (a few-KB
    PNG can declare gigabytes of pixels).
    """
    import cv2

    if color_order not in ("RGB", "BGR"):
        raise ValueError(f"color_order must be 'RGB' or 'BGR', not {color_order!r}")
    if isinstance(images, (pa.Array, pa.ChunkedArray)):
        images = images.to_pylist()
    out: np.ndarray | None = None
    for i, data in enumerate(images):
        pixels = None
        if data:
            refusal = size_problem(data, max_pixels)
            if refusal is not None and refusal[0] == "too_large":
                raise DataError(refusal[1], None, i)
            pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if pixels is None:
            raise DataError("undecodable image", None, i)
        if size is not None and pixels.shape[:2] != tuple(size):
            pixels = cv2.resize(pixels, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        if out is None:
            out = np.empty((len(images), *pixels.shape), dtype=np.uint8)
        elif pixels.shape != out.shape[1:]:
            raise DataError(f"image shape {pixels.shape} differs from {out.shape[1:]}; pass size=", None, i)
        out[i] = pixels[..., ::-1] if color_order == "RGB" else pixels
    if out is None:
        h, w = size or (0, 0)
        out = np.empty((0, h, w, 3), dtype=np.uint8)
    return out


def images_to_tensor(images: np.ndarray, dtype=None):
    """NHWC uint8 images → a torch NCHW tensor (uint8 unless `dtype` is given; floats are scaled to [0,1])."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    if dtype is not None and dtype != torch.uint8:
        tensor = tensor.to(dtype) / 255.0
    return tensor
