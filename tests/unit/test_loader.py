"""The shard loader: disjoint equal parts per rank, per-epoch shuffle, resume, colour order, bad rows."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from facepipe.data.loader import ShardLoader, decode_rows, shard_units
from facepipe.errors import DataError, FacepipeError


def _jpeg(label: int, key: int, size: int = 16) -> bytes:
    # left half encodes the key's low byte in blue, right half plain: flips and colour order are visible
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[:, : size // 2, 0] = 200  # blue channel (cv2 is BGR)
    img[:, :, 2] = (key * 7) % 256
    ok, buf = cv2.imencode(".png", img)  # lossless so pixel checks are exact
    assert ok
    return buf.tobytes()


def write_shards(root: Path, n_shards: int = 3, rows: int = 50, row_group: int = 20) -> list[Path]:
    paths = []
    key = 0
    for s in range(n_shards):
        keys = np.arange(key, key + rows)
        key += rows
        table = pa.table(
            {
                "key": pa.array(keys, pa.int64()),
                "label": pa.array(keys // 5, pa.int64()),
                "image": pa.array([_jpeg(int(k // 5), int(k)) for k in keys], pa.binary()),
            }
        )
        path = root / f"shard-{s:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group)
        paths.append(path)
    return paths


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    return write_shards(tmp_path)


def _keys_of(loader: ShardLoader, epoch: int) -> np.ndarray:
    unit_idx, row_idx, _ = loader.plan(epoch)
    # key = 50 * shard + row-group offset + row
    keys = []
    for u, r in zip(unit_idx, row_idx, strict=True):
        unit = loader.units[u]
        shard = int(Path(unit.path).stem.split("-")[1])
        keys.append(shard * 50 + unit.row_group * 20 + r)
    return np.array(keys)


def test_units_and_steps(shards):
    units = shard_units(shards)
    assert [u.rows for u in units] == [20, 20, 10] * 3
    loader = ShardLoader(shards, batch_size=16, world_size=2, rank=1)
    assert loader.rows_per_rank == 75 and len(loader) == 4


def test_ranks_are_disjoint_and_balanced(shards):
    loaders = [ShardLoader(shards, batch_size=8, world_size=3, rank=r) for r in range(3)]
    parts = [_keys_of(loader, epoch=2) for loader in loaders]
    assert all(len(p) == len(loaders[0]) * 8 for p in parts)
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything)  # no row on two ranks
    assert len(set(np.unique(everything))) == 3 * 48


def test_shuffle_changes_per_epoch_and_is_deterministic(shards):
    loader = ShardLoader(shards, batch_size=10)
    a, b = _keys_of(loader, 0), _keys_of(loader, 1)
    assert not np.array_equal(a, b)
    assert np.array_equal(a, _keys_of(ShardLoader(shards, batch_size=10), 0))
    assert sorted(a) == sorted(b) == list(range(150))
    plain = ShardLoader(shards, batch_size=10, shuffle=False)
    assert list(_keys_of(plain, 0)) == list(range(150))


def test_batches_match_plan_and_resume(shards):
    with ShardLoader(shards, batch_size=12, input_size=(16, 16), seed=3) as loader:
        full = list(loader.epoch(1))
        resumed = list(loader.epoch(1, start_batch=4))
    assert [b.index for b in full] == list(range(len(loader)))
    assert [b.index for b in resumed] == list(range(4, len(loader)))
    for a, b in zip(full[4:], resumed, strict=True):
        assert np.array_equal(a.images.numpy(), b.images.numpy())
        assert np.array_equal(a.labels.numpy(), b.labels.numpy())
    labels = np.concatenate([b.labels.numpy() for b in full])
    assert sorted(labels) == sorted(_keys_of(loader, 1) // 5)
    images = full[0].images  # uint8 NHWC: the training step normalises on its device
    assert tuple(images.shape) == (12, 16, 16, 3) and images.dtype == torch.uint8
    assert images[..., 2].amax(dim=(1, 2)).tolist() == [200] * 12  # every image's blue half, unscaled


def test_process_mode_gives_same_batches(shards):
    with ShardLoader(shards, batch_size=12, input_size=(16, 16), mode="thread") as a:
        first = next(iter(a.epoch(0)))
    with ShardLoader(shards, batch_size=12, input_size=(16, 16), mode="process", workers=1) as b:
        second = next(iter(b.epoch(0)))
    assert np.array_equal(first.images.numpy(), second.images.numpy())


def test_colour_order_and_flip(shards):
    rows = np.array([0, 1])
    pieces = [(str(shards[0]), 0, rows)]
    rgb, labels = decode_rows(pieces, np.array([False, True]), (16, 16), "RGB")
    bgr, _ = decode_rows(pieces, np.array([False, False]), (8, 8), "BGR")
    assert list(labels) == [0, 0]
    assert rgb[0, 0, 0, 2] == 200 and rgb[0, 0, -1, 2] == 0  # blue on the left, RGB order
    assert rgb[1, 0, -1, 2] == 200  # flipped: blue on the right
    assert bgr.shape == (2, 8, 8, 3) and bgr[0, 0, 0, 0] == 200
    # BGR decoding + a colour swap gives RGB decoding's bytes (libjpeg-turbo emits RGB directly)
    bgr16, _ = decode_rows(pieces, np.array([False, True]), (16, 16), "BGR")
    assert np.array_equal(bgr16[..., ::-1], rgb)


def test_decodes_into_the_given_batch_buffer(shards):
    pieces = [(str(shards[0]), 0, np.array([3, 4, 5]))]
    buffer = np.zeros((3, 16, 16, 3), np.uint8)
    images, _ = decode_rows(pieces, np.zeros(3, bool), (16, 16), "RGB", out=buffer)
    assert images is buffer and buffer[:, 0, 0, 2].tolist() == [200] * 3
    with pytest.raises(FacepipeError, match="batch buffer"):
        decode_rows(pieces, np.zeros(3, bool), (16, 16), "RGB", out=np.zeros((2, 16, 16, 3), np.uint8))


def test_decode_pool_follows_the_cores_given():
    from facepipe.cores import available_cores
    from facepipe.data.loader_plan import assigned_cores, decode_workers

    cores = available_cores()  # outside Ray: the affinity mask, capped by a container's CPU quota
    assert assigned_cores() == cores
    assert decode_workers(None) == decode_workers(0) == cores
    assert decode_workers(cores + 5) == cores and decode_workers(1) == 1


def test_bad_image_names_shard_and_row(tmp_path):
    table = pa.table(
        {"key": [0, 1], "label": [0, 0], "image": pa.array([_jpeg(0, 0), b"not an image"], pa.binary())}
    )
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with (
        ShardLoader([path], batch_size=2, shuffle=False, flip=False) as loader,
        pytest.raises(DataError) as err,
    ):
        list(loader.epoch(0))
    assert "bad.parquet" in str(err.value) and "row 1" in str(err.value)


def test_too_few_rows_is_a_clear_error(shards):
    with pytest.raises(FacepipeError, match="no full batch"):
        ShardLoader(shards, batch_size=100, world_size=2)


def test_stopping_early_leaves_no_thread_behind(shards):
    import threading

    with ShardLoader(shards, batch_size=4, input_size=(16, 16)) as loader:
        for batch in loader.epoch(0):
            assert batch.index == 0
            break
    assert not any(t.name == "facepipe-feeder" for t in threading.enumerate())


def test_binary_column_views_match_arrow_values():
    from facepipe.data.loader_read import BinaryColumn

    for kind in (pa.binary(), pa.large_binary()):
        array = pa.array([b"ab", None, b"cde", b"", b"f"], kind).slice(1)  # a slice keeps absolute offsets
        column = BinaryColumn(array)
        got = [None if column[i] is None else bytes(column[i]) for i in range(len(array))]
        assert got == array.to_pylist()
