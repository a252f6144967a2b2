"""`facepipe decode`: fixture conversion, determinism, multiple sources, bad input and --skip-bad."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from facepipe.cli import main
from facepipe.data.decode.hashing import hash_mapped
from facepipe.data.decode.job import decode_dataset
from facepipe.data.formats import recordio as rio
from facepipe.data.formats.insightface import write_training_set
from facepipe.data.formats.verification_bin import write_bin
from facepipe.data.shard_writer import ShardWriter
from facepipe.data.shards import list_shards, read_manifest, read_pair_table
from facepipe.errors import DataError
from facepipe.fsutil import sha256_file

# ------------------------------------------------------------------------------------------- helpers


def make_classes(n_classes: int, per_class: int, seed: int = 0, size: int = 32) -> list[list[bytes]]:
    rng = np.random.default_rng(seed)
    classes = []
    for _ in range(n_classes):
        base = rng.integers(0, 256, 3)
        images = []
        for _ in range(per_class):
            pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            images.append(cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
        classes.append(images)
    return classes


def make_source(folder: Path, n_classes=6, per_class=5, seed=0, pairs=4, **kwargs) -> Path:
    classes = make_classes(n_classes, per_class, seed)
    write_training_set(folder, classes, image_size=(32, 32), **kwargs)
    if pairs:
        flat = [im for images in classes for im in images]
        write_bin(folder / "val.bin", flat[: 2 * pairs], [i % 2 == 0 for i in range(pairs)])
    return folder


def copy_files(folder: Path, dest: Path, names) -> Path:
    """A fresh source folder `dest` holding copies of `names` from `folder` (fixtures stay read-only)."""
    dest.mkdir()
    for name in names:
        shutil.copy(folder / name, dest / name)
    return dest


def write_flat_set(folder: Path, images: list[bytes], per_class: int, first_key: int = 0) -> Path:
    """A flat `.rec`/`.idx` (no header record, no identity records): image i has class i // per_class."""
    folder.mkdir()
    with rio.IndexedRecordWriter(folder / "train.rec", folder / "train.idx") as writer:
        for i, image in enumerate(images):
            key = first_key + i
            writer.write(key, rio.pack(rio.IRHeader(0, float(i // per_class), key, 0), image))
    return folder


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in list_shards(out)}


def read_rows(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in list_shards(out))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def fixture_source(recordio_dir, tmp_path):
    bins = sorted(p.name for p in recordio_dir.glob("*.bin"))
    names = ["tiny_train.rec", "tiny_train.idx", "property", *bins]
    return copy_files(recordio_dir, tmp_path / "tiny", names)


def test_decode_fixture(recordio_dir, fixture_source, tmp_path):
    exp = json.loads((recordio_dir / "tiny_train.expected.json").read_text())
    out = tmp_path / "out"
    manifest = decode_dataset([fixture_source], out, target_bytes=100_000, workers=1, validate=True)
    assert manifest == read_manifest(out) | {"_run": manifest["_run"]}
    assert manifest["num_images"] == 60 and manifest["num_classes"] == 12
    assert manifest["image_size"] == [112, 112] and manifest["color_order"] == "RGB"
    assert len(manifest["shards"]) > 1
    for shard in manifest["shards"]:
        path = out / shard["path"]
        assert sha256_file(path) == shard["sha256"] and path.stat().st_size == shard["bytes"]
        assert pq.read_metadata(path).num_rows == shard["rows"]
    rows = read_rows(out)
    assert rows.num_rows == 60 and set(rows["dataset"].to_pylist()) == {"tiny"}
    labels = dict(zip(rows["key"].to_pylist(), rows["label"].to_pylist(), strict=True))
    assert {str(k): v for k, v in labels.items()} == exp["image_class_by_key"]
    payload_sha = {r["key"]: r["payload_sha256"] for r in exp["records"]}
    for key, image in zip(rows["key"].to_pylist(), rows["image"].to_pylist(), strict=True):
        assert sha(image) == payload_sha[key]  # stored bytes, not re-encoded
    source = manifest["sources"][0]
    assert source["label_offset"] == 0 and source["num_classes"] == 12 and source["key_range"] == [1, 60]
    assert source["layout"] == "header" and source["label_convention"] == "scalar"
    # The default fingerprint is xxh3-128 of the file as MXNet wrote it (anchored on MXNet's sha256 of it,
    # hashed the way decode hashes; test_face2rec2_and_two_sources records sha256 itself).
    rec = fixture_source / "tiny_train.rec"
    assert hash_mapped(rec, "sha256") == exp["rec_file_sha256"]
    assert manifest["settings"]["source_hash"] == "xxh3_128"
    assert source["files"]["tiny_train.rec"] == {
        "size": exp["rec_file_size"],
        "xxh3_128": xxhash.xxh3_128(rec.read_bytes()).hexdigest(),
    }
    assert set(source["files"]) >= {"tiny_train.idx", "property", "tiny_val.bin"}
    for name, entry in source["files"].items():
        data = (fixture_source / name).read_bytes()
        assert entry == {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}, name
    val = json.loads((recordio_dir / "tiny_val.expected.json").read_text())
    assert len(manifest["pairs"]) == 4
    for name, entry in manifest["pairs"].items():
        table = read_pair_table(out / entry["path"])
        assert entry["pairs"] == 20 and sha256_file(out / entry["path"]) == entry["sha256"], name
        assert table["issame"].to_pylist() == val["issame_list"]
        assert table["fold"].to_pylist() == [i * 10 // 20 for i in range(20)]
        assert [sha(b) for b in table["image_a"].to_pylist()] == [
            im["payload_sha256"] for im in val["images"][0::2]
        ]


def test_face2rec2_and_two_sources(recordio_dir, fixture_source, tmp_path):
    f2r = copy_files(recordio_dir, tmp_path / "f2r", [f"f2r_train{s}" for s in (".rec", ".idx", ".property")])
    exp = json.loads((recordio_dir / "f2r_train.expected.json").read_text())
    manifest = decode_dataset(
        [fixture_source, f2r], tmp_path / "out", target_bytes=1 << 20, workers=1, source_hash="sha256"
    )
    assert manifest["num_classes"] == 16 and manifest["num_images"] == 68
    first, second = manifest["sources"]
    # sha256 on request: the recorded digests are MXNet's own for the files it wrote
    tiny = json.loads((recordio_dir / "tiny_train.expected.json").read_text())
    assert first["files"]["tiny_train.rec"] == {
        "size": tiny["rec_file_size"],
        "sha256": tiny["rec_file_sha256"],
    }
    assert first["files"]["tiny_train.idx"]["sha256"] == tiny["idx_file_sha256"]
    assert second["files"]["f2r_train.rec"] == {
        "size": exp["rec_file_size"],
        "sha256": exp["rec_file_sha256"],
    }
    assert (first["label_offset"], first["num_classes"]) == (0, 12)
    assert (second["label_offset"], second["num_classes"], second["label_convention"]) == (12, 4, "array")
    assert second["shards"][0] == first["shards"][1]  # shard numbering continues
    rows = read_rows(tmp_path / "out").to_pylist()
    f2r_labels = {str(r["key"]): r["label"] - 12 for r in rows if r["dataset"] == "f2r"}
    assert f2r_labels == exp["image_class_by_key"]
    assert {r["label"] for r in rows if r["dataset"] == "tiny"} == set(range(12))


def test_mxnet_multilabel_file_given_as_rec_path(recordio_dir, tmp_path):
    """MXNet's label edge cases, without header or property: odd records are rejected with reasons."""
    src = copy_files(recordio_dir, tmp_path / "ml", ["multilabel.rec", "multilabel.idx"])
    with pytest.raises(DataError, match=r"label 1\.5 is not a class index.*multilabel\.rec.*record 2"):
        decode_dataset([src / "multilabel.rec"], tmp_path / "strict", workers=1)
    manifest = decode_dataset(
        [src / "multilabel.rec"], tmp_path / "out", workers=1, validate=True, skip_bad=True
    )
    reasons = {r["key"]: r["reason"] for r in pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()}
    assert sorted(reasons) == [2, 3, 4, 6, 7]
    assert "not a class index" in reasons[2] and "empty payload" in reasons[4]
    assert reasons[3] == reasons[6] == reasons[7] == "undecodable image"  # 5/3/4-byte non-image payloads
    rows = read_rows(tmp_path / "out")
    assert dict(zip(rows["key"].to_pylist(), rows["label"].to_pylist(), strict=True)) == {0: 3, 1: 7, 5: 42}
    assert manifest["num_classes"] == 43 and manifest["sources"][0]["layout"] == "flat"


def test_deterministic_whatever_the_workers(tmp_path):
    src = make_source(tmp_path / "src", n_classes=10, per_class=8)
    one = decode_dataset([src], tmp_path / "one", target_bytes=12_000, workers=1)
    two = decode_dataset([src], tmp_path / "two", target_bytes=12_000, workers=2)
    assert len(one["shards"]) >= 4
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert one["shards"] == two["shards"]
    assert one["_run"]["source_hash_cache_hits"] == 0
    again = decode_dataset([src], tmp_path / "one", target_bytes=12_000, workers=1)
    assert again["_run"]["skipped_shards"] == len(one["shards"])  # a rerun finds every range done
    assert again["_run"]["source_hash_cache_hits"] == len(again["sources"][0]["files"])  # rec, idx, ...
    assert again["shards"] == one["shards"]
    # another source hash: the shards are still done, but no cached digest of the other kind is reused
    other = decode_dataset([src], tmp_path / "one", target_bytes=12_000, workers=1, source_hash="sha256")
    assert other["_run"]["skipped_shards"] == len(one["shards"]) and other["shards"] == one["shards"]
    assert other["_run"]["source_hash_cache_hits"] == 0
    assert other["sources"][0]["files"]["train.rec"] == {
        "size": (src / "train.rec").stat().st_size,
        "sha256": sha256_file(src / "train.rec"),
    }
    keys = read_rows(tmp_path / "one")["key"].to_pylist()
    assert keys == list(range(1, 81))


def test_failed_write_on_the_writer_thread_stops_cleanly(tmp_path, monkeypatch):
    """Row groups are written on a thread while the next chunk is parsed: a failure there (a full disk)
    stops the range with that error, leaves no shard, temp file or marker, and a rerun is complete."""
    src = make_source(tmp_path / "src", n_classes=10, per_class=8, pairs=0)
    out = tmp_path / "out"
    threads: list[str] = []
    real_write = ShardWriter.write

    def failing_write(self, table):
        threads.append(threading.current_thread().name)
        if len(threads) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, table)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        decode_dataset([src], out, workers=1, row_group_bytes=2_000)
    assert len(threads) == 3 and all(name.startswith("shard-writer") for name in threads)
    assert not list((out / "train").iterdir()) and not list((out / ".decode").glob("part-*"))
    assert not (out / "manifest.json").exists()

    monkeypatch.undo()
    manifest = decode_dataset([src], out, workers=1, row_group_bytes=2_000)
    rows = read_rows(out)
    assert pq.read_metadata(out / manifest["shards"][0]["path"]).num_row_groups > 3
    assert rows["key"].to_pylist() == list(range(1, 81))  # row groups in order, none lost
    with rio.IndexedRecordFile(src / "train.rec", src / "train.idx") as rec:
        stored = [rec.read_header(key)[1] for key in range(1, 81)]
    assert rows["image"].to_pylist() == stored


def test_custom_runner_gets_picklable_tasks(tmp_path):
    """What a Ray task would do: receive a pickled task, run the top-level function, return the result."""
    import pickle

    from facepipe.data.decode.job import convert_range

    src = make_source(tmp_path / "src", n_classes=4, per_class=4)
    calls = []

    def runner(fn, tasks):
        assert fn is convert_range
        for task in reversed(tasks):  # any order
            calls.append(task["index"])
            yield pickle.loads(pickle.dumps(fn))(pickle.loads(pickle.dumps(task)))

    remote = decode_dataset([src], tmp_path / "remote", target_bytes=3_000, runner=runner)
    local = decode_dataset([src], tmp_path / "local", target_bytes=3_000, workers=1)
    assert sorted(calls) == list(range(len(local["shards"]))) and len(calls) > 1
    assert remote["shards"] == local["shards"]


def test_changed_settings_replace_old_shards(tmp_path):
    src = make_source(tmp_path / "src")
    decode_dataset([src], tmp_path / "out", target_bytes=4_000, workers=1)
    many = len(list_shards(tmp_path / "out"))
    (src / "val.bin").rename(src / "other.bin")
    (tmp_path / "out" / "rejects.parquet").write_bytes(b"from an earlier --skip-bad run")
    manifest = decode_dataset([src], tmp_path / "out", target_bytes=1 << 20, workers=1)
    assert many > 1 and len(list_shards(tmp_path / "out")) == len(manifest["shards"]) == 1
    assert sorted(p.name for p in (tmp_path / "out" / "pairs").iterdir()) == ["other.parquet"]
    assert not (tmp_path / "out" / "rejects.parquet").exists()
    assert manifest["_run"]["skipped_shards"] == 0
    assert read_rows(tmp_path / "out").num_rows == 30


def test_changed_source_is_converted_again(tmp_path):
    src = make_source(tmp_path / "src", pairs=0)
    first = decode_dataset([src], tmp_path / "out", workers=1)
    os.utime(src / "train.rec", ns=(1, 1))  # same bytes, different mtime: cannot be trusted as unchanged
    again = decode_dataset([src], tmp_path / "out", workers=1)
    assert again["_run"]["skipped_shards"] == 0 and again["shards"] == first["shards"]


def test_degradation_sidecar_joined(tmp_path):
    src = make_source(tmp_path / "src", n_classes=2, per_class=3, pairs=0)
    pq.write_table(
        pa.table({"key": [1, 2, 3, 5], "degradation": [0.0, 0.5, 1.0, 0.25]}), src / "degradation.parquet"
    )
    write_bin(src / "val.bin", [b"\xff\xd8a", b"\xff\xd8b"] * 3, [True, False, True])
    pq.write_table(
        pa.table({"degradation_a": [0.1, 0.2, None], "degradation_b": [0.9, 0.8, 0.7]}),
        src / "val.degradation.parquet",
    )
    manifest = decode_dataset([src], tmp_path / "out", workers=1)
    rows = read_rows(tmp_path / "out")
    assert rows["degradation"].to_pylist() == [0.0, 0.5, 1.0, None, 0.25, None]
    assert manifest["sources"][0]["degradation_sidecar"] == "degradation.parquet"
    pairs = read_pair_table(tmp_path / "out" / "pairs" / "val.parquet")
    assert pairs["degradation_a"].to_pylist() == pytest.approx([0.1, 0.2, None])
    assert pairs["degradation_b"].to_pylist() == pytest.approx([0.9, 0.8, 0.7])


def test_flat_set_without_property(tmp_path):
    src = write_flat_set(tmp_path / "flat", [im for c in make_classes(3, 2) for im in c], per_class=2)
    manifest = decode_dataset([src], tmp_path / "out", workers=1)
    assert manifest["num_classes"] == 3 and manifest["num_images"] == 6 and manifest["image_size"] == [32, 32]


# ---------------------------------------------------------------------------------------- bad input


def _offset(src: Path, key: int) -> int:
    with rio.IndexedRecordFile(src / "train.rec", src / "train.idx") as rec:
        return rec.offset(key)


def test_truncated_rec(tmp_path):
    src = make_source(tmp_path / "src", pairs=0)
    rec = src / "train.rec"
    cut = _offset(src, 30) + 20  # inside image key 30, the last image; identities and header are gone too
    rec.write_bytes(rec.read_bytes()[:cut])
    # RecBuilder writes the header last, so the first thing found missing is record 0
    with pytest.raises(DataError, match=r"past the end of the file.*train\.rec.*record 0"):
        decode_dataset([src], tmp_path / "out", workers=1)


def test_truncated_rec_without_header(tmp_path):
    src = write_flat_set(tmp_path / "flat", [im for c in make_classes(2, 3) for im in c], per_class=3)
    (src / "property").write_text("2,32,32\n")
    data = (src / "train.rec").read_bytes()
    (src / "train.rec").write_bytes(data[: _offset(src, 5) + 100])
    with pytest.raises(DataError, match=r"truncated record.*train\.rec.*record 5"):
        decode_dataset([src], tmp_path / "out", workers=1)
    manifest = decode_dataset([src], tmp_path / "skip", workers=1, skip_bad=True)
    assert manifest["num_images"] == 5 and manifest["rejects"]["count"] == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_magic(tmp_path, workers):
    src = make_source(tmp_path / "src", pairs=0)
    data = bytearray((src / "train.rec").read_bytes())
    data[_offset(src, 7)] ^= 0x55
    (src / "train.rec").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bad magic.*train\.rec.*record 7"):
        decode_dataset([src], tmp_path / "out", workers=workers, target_bytes=5_000)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_index_entry_past_end(tmp_path):
    src = make_source(tmp_path / "src", pairs=0)
    lines = (src / "train.idx").read_text().splitlines()
    lines = [f"12\t{10**9}" if line.startswith("12\t") else line for line in lines]
    (src / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"past the end.*record 12"):
        decode_dataset([src], tmp_path / "out", workers=1)


def test_identity_ranges_disagree_with_labels(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    images = [im for c in make_classes(2, 3) for im in c]
    with rio.IndexedRecordWriter(src / "train.rec", src / "train.idx") as writer:
        for key, image in enumerate(images, start=1):
            label = 1.0 if key == 2 else float((key - 1) // 3)  # key 2 claims class 1, its range says 0
            writer.write(key, rio.pack(rio.IRHeader(0, label, key, 0), image))
        writer.write(7, rio.pack(rio.IRHeader(0, [1.0, 4.0], 7, 0), b""))
        writer.write(8, rio.pack(rio.IRHeader(0, [4.0, 7.0], 8, 0), b""))
        writer.write(0, rio.pack(rio.IRHeader(0, [7.0, 9.0], 0, 1), b""))
    with pytest.raises(DataError, match=r"disagrees with the identity ranges.*record 2"):
        decode_dataset([src], tmp_path / "out", workers=1)


def _corrupt_image(src: Path, key: int) -> None:
    """Replace image `key`'s JPEG by same-length junk (frames stay valid)."""
    data = bytearray((src / "train.rec").read_bytes())
    start = _offset(src, key) + 8 + 24
    length = int.from_bytes(data[_offset(src, key) + 4 : _offset(src, key) + 8], "little") - 24
    data[start : start + length] = b"\x00" * length
    (src / "train.rec").write_bytes(bytes(data))


def test_undecodable_image_only_caught_with_validate(tmp_path):
    src = make_source(tmp_path / "src", pairs=0)
    _corrupt_image(src, 4)
    assert decode_dataset([src], tmp_path / "plain", workers=1)["num_images"] == 30
    with pytest.raises(DataError, match=r"undecodable image.*record 4"):
        decode_dataset([src], tmp_path / "out", workers=1, validate=True)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_skip_bad_records_rejects(tmp_path):
    src = make_source(tmp_path / "src", pairs=3)
    _corrupt_image(src, 4)
    data = bytearray((src / "train.rec").read_bytes())
    data[_offset(src, 9)] ^= 0x55  # bad magic on key 9
    (src / "train.rec").write_bytes(bytes(data))
    manifest = decode_dataset(
        [src], tmp_path / "out", workers=2, validate=True, skip_bad=True, target_bytes=5_000
    )
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert [(r["source"], r["key"]) for r in rejects] == [("src", 4), ("src", 9)]
    assert rejects[0]["reason"] == "undecodable image" and "bad magic" in rejects[1]["reason"]
    assert manifest["rejects"] == {"count": 2, "path": "rejects.parquet"}
    keys = read_rows(tmp_path / "out")["key"].to_pylist()
    assert keys == [k for k in range(1, 31) if k not in (4, 9)]
    assert manifest["num_images"] == 28 and manifest["sources"][0]["rejected"] == 2


def test_empty_image_payload(tmp_path):
    images = [im for c in make_classes(2, 2) for im in c]
    images[2] = b""
    src = write_flat_set(tmp_path / "flat", images, per_class=2)
    with pytest.raises(DataError, match=r"empty payload.*record 2"):
        decode_dataset([src], tmp_path / "out", workers=1)


def test_bad_pair_image(tmp_path):
    src = make_source(tmp_path / "src", n_classes=2, per_class=10, pairs=0)
    good = make_classes(1, 20, seed=5)[0]
    images = list(good)
    images[7] = b"garbage"  # second image of pair 3
    write_bin(src / "lfw.bin", images, [p % 2 == 0 for p in range(10)])
    with pytest.raises(DataError, match=r"undecodable image in pair 3.*lfw\.bin"):
        decode_dataset([src], tmp_path / "out", workers=1, validate=True)
    manifest = decode_dataset([src], tmp_path / "skip", workers=1, validate=True, skip_bad=True)
    table = read_pair_table(tmp_path / "skip" / "pairs" / "lfw.parquet")
    assert manifest["pairs"]["lfw"]["pairs"] == 9
    assert table["fold"].to_pylist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]  # folds of the original file order
    assert manifest["rejects"]["count"] == 1
    rejects = pq.read_table(tmp_path / "skip" / "rejects.parquet").to_pylist()
    # a .bin pair image has no byte offset of its own (the pickle holds the images): null
    assert rejects == [{"source": "src/lfw.bin", "key": 7, "reason": "undecodable image", "offset": None}]


# ----------------------------------------------------------------------------------------------- CLI


def test_cli(tmp_path, capsys):
    src = make_source(tmp_path / "src")
    assert main(["decode", str(src), str(tmp_path / "out"), "--target-mb", "0.01", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "facepipe decode: done" in printed and "images" in printed and "30" in printed
    manifest = read_manifest(tmp_path / "out")
    assert manifest["pairs"]["val"]["pairs"] == 4 and manifest["settings"]["target_bytes"] == 10485
    assert main(["decode", str(src), str(tmp_path / "bgr"), "--color-order", "BGR", "--validate"]) == 0
    assert read_manifest(tmp_path / "bgr")["color_order"] == "BGR"
    assert main(["decode", str(src), str(tmp_path / "sha"), "--source-hash", "sha256"]) == 0
    sha_files = read_manifest(tmp_path / "sha")["sources"][0]["files"]
    assert sha_files["train.rec"]["sha256"] == sha256_file(src / "train.rec")
    fast = manifest["sources"][0]["files"]["train.rec"]
    assert fast["xxh3_128"] == hash_mapped(src / "train.rec", "xxh3_128") and "sha256" not in fast
    assert main(["decode", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "source does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_a_source_converted_as_one_range_is_hashed_by_it(tmp_path, monkeypatch, algorithm):
    """One range reads its whole `.rec` anyway: it hashes it on the way (header and identity records
    included), so no thread reads the file a second time, and the digest is the file's."""
    from facepipe.data.decode import resume as decode_resume

    src = make_source(tmp_path / "src", n_classes=10, per_class=8)
    hashed = []
    real = decode_resume.hash_mapped

    def counting(path, *args, **kwargs):
        hashed.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(decode_resume, "hash_mapped", counting)
    manifest = decode_dataset([src], tmp_path / "out", source_hash=algorithm)
    assert len(manifest["shards"]) == 1 and "train.rec" not in hashed and "train.idx" in hashed
    data = (src / "train.rec").read_bytes()
    expected = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}[algorithm](data).hexdigest()
    assert manifest["sources"][0]["files"]["train.rec"] == {"size": len(data), algorithm: expected}
