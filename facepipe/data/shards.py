"""Parquet shards: the one training format, plus verification pair tables (their schemas, writing, reading).

A training shard holds one row per image with the encoded bytes exactly as they came (never re-encoded).
Row groups are bounded in bytes, so a reader streams a shard a row group at a time and no column chunk
comes near Parquet's/Arrow's 2 GiB limits. Files are written to a temporary name and renamed when
complete, so nothing half-written looks like a shard. Where a dataset keeps them (the layout, the
manifest): :mod:`facepipe.data.dataset`; the manifest and listing functions here are kept for callers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facepipe.data.dataset import MANIFEST_NAME, TRAIN_DIR, Dataset, list_parquet, read_manifest
from facepipe.data.formats.image_header import DEFAULT_MAX_PIXELS, size_problem
from facepipe.errors import DataError
from facepipe.fsutil import atomic_path
from facepipe.storage import is_remote, join, open_input_file

__all__ = [
    "TRAIN_SCHEMA",
    "PAIR_SCHEMA",
    "REJECT_SCHEMA",
    "DECODE_REJECT_SCHEMA",
    "MANIFEST_NAME",
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

# one row per pair: each of its two sides (a, b) has an image and, when the source has a
# `<name>.degradation.parquet` sidecar (synthetic data), that image's degradation
PAIR_SCHEMA = pa.schema(
    [pa.field(f"image_{side}", pa.binary(), nullable=False) for side in "ab"]
    + [pa.field("issame", pa.bool_(), nullable=False), pa.field("fold", pa.int32(), nullable=False)]
    + [pa.field(f"degradation_{side}", pa.float32()) for side in "ab"]
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


# ------------------------------------------------------------------------------------------- manifest


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> Path:
    """Write OUT/manifest.json (local; see `Dataset.write_manifest`)."""
    return Path(Dataset(out_dir).write_manifest(manifest))


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
    if is_remote(path):
        with open_input_file(path) as handle:
            return pq.read_table(handle, schema=PAIR_SCHEMA)
    return pq.read_table(path, schema=PAIR_SCHEMA)


# --------------------------------------------------------------------------------------------- reading


def list_shards(directory: str | os.PathLike) -> list[Path] | list[str]:
    """Training shards in a folder (OUT/train of a dataset OUT, else the folder itself), in shard order;
    temp files excluded. Under a URI they are URIs (str), else Paths. A dataset's own shard list:
    `Dataset.open(OUT).training_shards`."""
    if is_remote(directory):
        return list_parquet(join(directory, TRAIN_DIR)) or list_parquet(directory)
    directory = Path(directory)
    if (directory / TRAIN_DIR).is_dir():
        directory = directory / TRAIN_DIR
    return list_parquet(directory)


def pair_tables(shards_dir: str | os.PathLike) -> dict[str, Path] | dict[str, str]:
    """name -> pair table of a dataset (`Dataset.at(shards_dir).pair_tables`)."""
    return Dataset.at(shards_dir).pair_tables  # type: ignore[return-value]


def fetch_pair_tables(location: str, dst: str | os.PathLike) -> Path:
    """Copy the manifest and pair tables of a dataset at a URI into `dst` (a local dataset folder
    without training shards); DataError when `location` holds no complete dataset."""
    return Path(Dataset.at(location).fetch_pairs(dst).location)


def iter_shard_batches(
    paths: Iterable[str | os.PathLike], columns: Sequence[str] | None = None, batch_rows: int = 1024
) -> Iterator[pa.RecordBatch]:
    """Stream RecordBatches of at most `batch_rows` rows from shards, one row group at a time."""
    for path in paths:
        try:
            # at a URI: range reads through the location's filesystem, a row group at a time
            handle = pq.ParquetFile(open_input_file(path) if is_remote(path) else path)
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
