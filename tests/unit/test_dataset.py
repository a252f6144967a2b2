"""facepipe.data.dataset: one object owns a decoded dataset's layout, manifest, shards and pair tables,
locally and on S3; its fingerprint follows the shards; degradation comes from the pair tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from facepipe.data.dataset import MANIFEST_NAME, Dataset, read_pair_degradation
from facepipe.data.shards import list_shards, pair_tables, write_pair_table
from facepipe.errors import DataError
from facepipe.fsutil import sha256_file
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures

TARGET_BYTES = 20_000  # two training shards for the tiny set below


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> Path:
    """A tiny generated dataset (raw/) and its decode (shards/)."""
    from facepipe.data.decode.job import decode_dataset
    from facepipe.data.synth.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("dataset")
    generate(root / "raw", SynthConfig(identities=6, images_per_identity=4, pairs=20, size=32, seed=1))
    decode_dataset([root / "raw"], root / "shards", target_bytes=TARGET_BYTES)
    return root


def _copy(dataset: Dataset, dst: Path) -> Dataset:
    """Write `dataset` again through `Dataset.create`, the way a writer lays a dataset out."""
    copy = Dataset.create(dst)
    for shard, entry in zip(dataset.training_shards, dataset.manifest["shards"], strict=True):
        shutil.copyfile(shard, copy.path_of(entry["path"]))
    for name, table in dataset.pair_tables.items():
        Path(copy.pair_table_path(name)).parent.mkdir(exist_ok=True)
        shutil.copyfile(table, copy.pair_table_path(name))
    copy.write_manifest(dataset.manifest)
    return copy


def test_open_reads_what_decode_wrote(decoded):
    out = decoded / "shards"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    ds = Dataset.open(out)
    assert ds.location == out and ds.manifest == manifest
    assert (ds.num_classes, ds.num_images, ds.image_size, ds.color_order) == (6, 24, (32, 32), "RGB")
    assert len(ds.training_shards) == 2 and ds.training_shards == list_shards(out)
    assert all(Path(p).parent == out / "train" for p in ds.training_shards)
    assert list(ds.pair_tables) == sorted(manifest["pairs"]) == ["synth_hard", "synth_val"]
    assert ds.pair_tables == pair_tables(out)
    assert ds.manifest_path == out / "manifest.json" and ds.pairs_dir == out / "pairs"
    assert ds.rejects_path == out / "rejects.parquet" and ds.labels_path == out / "labels.json"
    assert ds.pair_table_path("synth_val") == out / manifest["pairs"]["synth_val"]["path"]


def test_create_then_open_round_trip_keeps_the_fingerprint(decoded, tmp_path):
    ds = Dataset.open(decoded / "shards")
    copy = Dataset.create(tmp_path / "new")
    assert (tmp_path / "new" / "train").is_dir() and not copy.has_manifest()
    copy = _copy(ds, tmp_path / "new")
    reopened = Dataset.open(tmp_path / "new")
    assert reopened.manifest == ds.manifest
    assert [Path(p).name for p in reopened.training_shards] == [Path(p).name for p in ds.training_shards]
    assert list(reopened.pair_tables) == list(ds.pair_tables)
    assert reopened.fingerprint == ds.fingerprint == Dataset.open(decoded / "shards").fingerprint


def test_dataset_on_s3_reads_back_like_local(decoded, s3_bucket, tmp_path):  # noqa: F811
    from facepipe.data.decode.job import decode_dataset

    local = Dataset.open(decoded / "shards")
    location = f"{s3_bucket}/shards"
    decode_dataset([decoded / "raw"], location, target_bytes=TARGET_BYTES)
    remote = Dataset.open(location)
    assert remote.location == location and remote.has_manifest()
    assert remote.manifest["shards"] == local.manifest["shards"]
    assert remote.training_shards == list_shards(location)
    assert remote.training_shards == [f"{location}/train/{Path(p).name}" for p in local.training_shards]
    assert list(remote.pair_tables) == list(local.pair_tables)
    assert remote.fingerprint == local.fingerprint
    for name in local.pair_tables:
        np.testing.assert_array_equal(remote.pair_degradation(name), local.pair_degradation(name))
    # evaluation's local copy: manifest and pair tables, no training shards
    fetched = remote.fetch_pairs(tmp_path / "fetched")
    assert Dataset.open(tmp_path / "fetched").manifest == local.manifest
    assert {n: Path(p).read_bytes() for n, p in fetched.pair_tables.items()} == {
        n: Path(p).read_bytes() for n, p in local.pair_tables.items()
    }
    # a writer's manifest on object storage, read back
    other = Dataset.create(f"{s3_bucket}/other")
    other.write_manifest({"num_images": 0, "num_classes": 1, "shards": []})
    assert Dataset.open(f"{s3_bucket}/other").num_classes == 1
    with pytest.raises(DataError, match=f"no manifest.*{s3_bucket}/missing"):
        Dataset.open(f"{s3_bucket}/missing")


def test_missing_or_incomplete_manifest_names_the_location(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no manifest") as err:
        Dataset.open(empty)
    assert str(empty) in str(err.value)
    assert not Dataset.at(empty).has_manifest()
    (empty / MANIFEST_NAME).write_text('{"color_order": "RGB", "num_classes": 5}')
    with pytest.raises(DataError, match="incomplete manifest: no num_images, shards") as err:
        Dataset.open(empty)
    assert str(empty / MANIFEST_NAME) in str(err.value)
    assert Dataset.at(empty).num_classes == 5  # a pair-table folder may carry a partial manifest
    (empty / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(DataError, match="not a JSON object"):
        Dataset.open(empty)
    (empty / MANIFEST_NAME).write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        Dataset.open(empty)


def test_fingerprint_is_stable_and_follows_the_shards(decoded, tmp_path):
    from facepipe.data.decode.job import decode_dataset
    from facepipe.orchestration.stage_cache import path_state

    ds = Dataset.open(decoded / "shards")
    # decoded again elsewhere from the same source: the same data, the same fingerprint
    again = decode_dataset([decoded / "raw"], tmp_path / "again", target_bytes=TARGET_BYTES)
    assert Dataset.open(tmp_path / "again").fingerprint == ds.fingerprint
    assert path_state(tmp_path / "again") == {"manifest": ds.fingerprint}
    # other shards (another cut) are other data
    decode_dataset([decoded / "raw"], tmp_path / "one", target_bytes=1 << 30)
    assert Dataset.open(tmp_path / "one").fingerprint != ds.fingerprint

    # one shard rewritten (a row fewer) and recorded in the manifest: a new fingerprint
    copy = _copy(ds, tmp_path / "copy")
    shard = Path(copy.training_shards[1])
    pq.write_table(pq.read_table(shard).slice(1), shard)
    manifest = json.loads(json.dumps(again))
    manifest.pop("_run")
    manifest["shards"][1]["sha256"] = sha256_file(shard)
    copy.write_manifest(manifest)
    changed = Dataset.open(tmp_path / "copy").fingerprint
    assert changed != ds.fingerprint and len(changed) == 64
    # how the images are read is part of it too
    copy.write_manifest({**manifest, "color_order": "BGR"})
    assert Dataset.open(tmp_path / "copy").fingerprint not in (changed, ds.fingerprint)


def test_degradation_comes_from_the_pair_tables_as_generated(decoded, tmp_path):
    ds = Dataset.open(decoded / "shards")
    for name in ds.pair_tables:
        sidecar = pq.read_table(decoded / "raw" / f"{name}.degradation.parquet")
        generated = np.stack([sidecar.column(c).to_numpy() for c in ("degradation_a", "degradation_b")], 1)
        got = ds.pair_degradation(name)
        assert got.dtype == generated.dtype == np.float32
        np.testing.assert_array_equal(got, generated)
    with pytest.raises(DataError, match="no pair table 'nope'"):
        ds.pair_degradation("nope")
    # a table without degradation (real data), or with none known, has none
    write_pair_table(tmp_path / "plain.parquet", [b"a", b"b"] * 10, [True, False] * 5)
    assert read_pair_degradation(tmp_path / "plain.parquet") is None
    extra = {"degradation_a": [np.nan] * 10, "degradation_b": [0.5] * 10}
    write_pair_table(tmp_path / "half.parquet", [b"a", b"b"] * 10, [True, False] * 5, extra=extra)
    half = read_pair_degradation(tmp_path / "half.parquet")
    assert np.isnan(half[:, 0]).all() and (half[:, 1] == 0.5).all()
    none = {"degradation_a": [np.nan] * 10, "degradation_b": [np.nan] * 10}
    write_pair_table(tmp_path / "none.parquet", [b"a", b"b"] * 10, [True, False] * 5, extra=none)
    assert read_pair_degradation(tmp_path / "none.parquet") is None
