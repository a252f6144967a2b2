"""Parquet shard writer/reader, pair tables and manifest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facepipe.data import shard_writer, shards
from facepipe.data.shard_writer import ShardWriter
from facepipe.errors import DataError
from facepipe.fsutil import sha256_file


def _jpeg(seed: int, size=(24, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    image = np.zeros((*size, 3), np.uint8)
    image[..., 0] = 30  # B
    image[..., 2] = 220  # R
    image = np.clip(image + rng.integers(0, 8, image.shape), 0, 255).astype(np.uint8)
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _rows(n: int, image_bytes: int = 1000, start: int = 0) -> pa.Table:
    return pa.table(
        {
            "key": pa.array(range(start, start + n), pa.int64()),
            "label": pa.array([i % 3 for i in range(n)], pa.int64()),
            "image": pa.array([bytes([i % 256]) * image_bytes for i in range(n)], pa.binary()),
            "dataset": pa.array(["ds"] * n),
        }
    )


def test_writer_rolls_files_and_bounds_row_groups(tmp_path):
    with ShardWriter(tmp_path, target_bytes=10_000, row_group_bytes=3_000) as writer:
        writer.write(_rows(25))
        writer.write(_rows(7, start=25).to_batches()[0])
        written = writer.close()
    paths = shards.list_shards(tmp_path)
    assert [p.name for p in paths] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert [w["rows"] for w in written] == [10, 10, 10, 2]
    for entry, path in zip(written, paths, strict=True):
        assert entry["path"] == str(path)
        assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
        meta = pq.ParquetFile(path).metadata
        assert all(meta.row_group(i).num_rows <= 3 for i in range(meta.num_row_groups))
        assert pq.read_schema(path).equals(shards.TRAIN_SCHEMA)
    table = pa.concat_tables(pq.read_table(p) for p in paths)
    assert table["key"].to_pylist() == list(range(32))
    assert table["image"][5].as_py() == b"\x05" * 1000  # bytes kept exactly
    assert table["landmarks"].null_count == 32 and table["degradation"].null_count == 32
    assert not list(tmp_path.glob(".*.tmp"))


def test_start_index_and_single_huge_row(tmp_path):
    with ShardWriter(tmp_path, prefix="x", target_bytes=100, start_index=7) as writer:
        writer.write(_rows(2, image_bytes=500))
    assert [p.name for p in sorted(tmp_path.glob("*.parquet"))] == ["x-00007.parquet", "x-00008.parquet"]


def test_failed_write_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path) as writer:
        writer.write(_rows(3))
        raise RuntimeError("crash mid-shard")
    assert list(tmp_path.iterdir()) == []


def test_disk_error_leaves_no_shard(tmp_path):
    """A real write error: a child process whose file-size limit (RLIMIT_FSIZE) is below the shard."""
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from pathlib import Path
from tests.unit.test_shards import _rows
from facepipe.data.shard_writer import ShardWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
try:
    with ShardWriter(Path({str(tmp_path)!r})) as writer:
        writer.write(_rows(30, image_bytes=100_000))
except OSError as err:
    print("raised", err)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "raised" in done.stdout and "too large" in done.stdout.lower()
    assert list(tmp_path.iterdir()) == []


def test_writer_that_cannot_start_leaves_no_temp_file(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(shard_writer.pq, "ParquetWriter", broken)
    with pytest.raises(OSError, match="Input/output"), ShardWriter(tmp_path) as writer:
        writer.write(_rows(3))
    assert list(tmp_path.iterdir()) == []


def test_empty_shard_kept_on_request(tmp_path):
    writer = ShardWriter(tmp_path)
    written = writer.close(keep_empty=True)
    assert written[0]["rows"] == 0 and pq.read_table(written[0]["path"]).num_rows == 0


def test_conform(tmp_path):
    table = shards.conform(_rows(2).select(["image", "dataset", "label", "key"]))
    assert table.schema.equals(shards.TRAIN_SCHEMA)
    with pytest.raises(ValueError, match="'image'"):
        shards.conform(_rows(2).drop_columns(["image"]))
    with_marks = _rows(1).append_column("landmarks", pa.array([[float(i) for i in range(10)]]))
    assert shards.conform(with_marks)["landmarks"].type == pa.list_(pa.float32())


def test_binary_lengths_of_slices():
    array = pa.chunked_array([pa.array([b"a", b"bcd", None, b"ef"]).slice(1), pa.array([b"xyz"])])
    assert shards.binary_lengths(array).tolist() == [3, 0, 2, 3]
    assert shards.binary_lengths(pa.array([b"xyz", b""], pa.large_binary())).tolist() == [3, 0]


def test_column_to_numpy():
    column = pa.chunked_array([pa.array([1.5, None]), pa.array([2.0])])
    np.testing.assert_array_equal(shards.column_to_numpy(column, np.float32), [1.5, np.nan, 2.0])
    assert shards.column_to_numpy(pa.array([3, 4, 5]).slice(1), np.int64).tolist() == [4, 5]
    with pytest.raises(ValueError, match="nulls"):
        shards.column_to_numpy(pa.array([1, None]), np.int64)


def test_pair_table(tmp_path):
    images = [_jpeg(i) for i in range(46)]
    issame = [i % 2 == 0 for i in range(23)]
    entry = shards.write_pair_table(tmp_path / "pairs" / "lfw.parquet", images, issame)
    assert entry["pairs"] == 23 and entry["positives"] == 12
    table = shards.read_pair_table(tmp_path / "pairs" / "lfw.parquet")
    assert table["image_a"].to_pylist() == images[0::2] and table["image_b"].to_pylist() == images[1::2]
    assert table["issame"].to_pylist() == issame
    assert table["fold"].to_pylist() == shards.pair_folds(23).tolist()
    assert shards.pair_folds(6000)[599] == 0 and shards.pair_folds(6000)[600] == 1
    from sklearn.model_selection import KFold

    for n in (20, 23, 6000, 6007):
        expected = np.zeros(n, np.int32)
        for fold, (_, test) in enumerate(KFold(10, shuffle=False).split(np.arange(n))):
            expected[test] = fold
        assert np.array_equal(shards.pair_folds(n), expected), n


def test_reader_streams_and_decodes(tmp_path):
    images = [_jpeg(i) for i in range(5)]
    table = pa.table({"key": range(5), "label": [0] * 5, "image": images, "dataset": ["d"] * 5})
    with ShardWriter(tmp_path, row_group_bytes=1) as writer:
        writer.write(table)
    batches = list(
        shards.iter_shard_batches(shards.list_shards(tmp_path), columns=["key", "image"], batch_rows=2)
    )
    assert all(b.num_rows <= 2 for b in batches) and batches[0].schema.names == ["key", "image"]
    column = pa.concat_arrays([b.column("image") for b in batches])
    rgb = shards.decode_images(column, "RGB")
    bgr = shards.decode_images(column.to_pylist(), "BGR")
    assert rgb.shape == (5, 24, 32, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, bgr[..., ::-1])
    assert rgb[..., 0].mean() > 200 and rgb[..., 2].mean() < 50  # red stays red in RGB
    assert shards.decode_images(images, size=(12, 16)).shape == (5, 12, 16, 3)
    tensor = shards.images_to_tensor(rgb)
    assert tuple(tensor.shape) == (5, 3, 24, 32)
    with pytest.raises(DataError, match="undecodable image.*record 1"):
        shards.decode_images([images[0], b"not a jpeg"])
    with pytest.raises(DataError, match="not a readable Parquet"):
        (tmp_path / "junk.parquet").write_bytes(b"junk")
        list(shards.iter_shard_batches([tmp_path / "junk.parquet"]))


def test_manifest_round_trip(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        shards.read_manifest(tmp_path)
    shards.write_manifest(tmp_path, {"num_images": 3, "image_size": [112, 112], "color_order": "RGB"})
    assert shards.read_manifest(tmp_path)["image_size"] == [112, 112]


def test_binary_lengths_of_views():
    array = pa.array([b"a", b"bcd" * 10, b"", b"ef"], pa.binary_view())
    assert shards.binary_lengths(array).tolist() == [1, 30, 0, 2]
    chunked = pa.chunked_array([array.slice(1, 2), array])
    assert shards.binary_lengths(chunked).tolist() == [30, 0, 1, 30, 0, 2]


@pytest.mark.parametrize("metadata", [None, {b"made_by": b"facepipe test"}])
def test_shard_bytes_equal_a_plain_arrow_write(tmp_path, metadata):
    """The writer hands binary columns to Parquet as views and writes the footer's Arrow schema itself:
    the file must be byte for byte what pyarrow writes for the schema, and read back as that schema."""
    schema = shards.TRAIN_SCHEMA.with_metadata(metadata) if metadata else shards.TRAIN_SCHEMA
    rows = shards.conform(_rows(50, image_bytes=700), schema)
    with ShardWriter(tmp_path / "ours", row_group_bytes=20 * 700, schema=schema) as writer:
        writer.write(rows.slice(0, 30))
        writer.write(rows.slice(30))
    path = Path(writer.written[0]["path"])
    groups = [20, 10, 20]  # 20-row groups, cut again where the second write starts
    plain = tmp_path / "plain.parquet"
    with pq.ParquetWriter(plain, schema, **shards._writer_options(schema)) as reference:
        start = 0
        for size in groups:
            reference.write_table(rows.slice(start, size), row_group_size=size)
            start += size
    assert path.read_bytes() == plain.read_bytes()
    back, reference_back = pq.read_table(path), pq.read_table(plain)
    assert back.schema.equals(reference_back.schema, check_metadata=True) and back.equals(reference_back)
    assert back["image"].type == pa.binary() and back["image"].to_pylist() == rows["image"].to_pylist()
    assert (back.schema.metadata or {}).get(b"made_by") == (metadata or {}).get(b"made_by")
