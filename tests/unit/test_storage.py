"""facepipe.storage against a real S3 endpoint (moto_server): resolve, list, atomic publish after a kill,
and a decoded dataset on S3 read back exactly as from local disk."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from facepipe import storage
from facepipe.errors import DataError
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures


def test_resolve_local_and_s3(s3_bucket, tmp_path, monkeypatch):  # noqa: F811
    fs, path = storage.resolve(tmp_path / "x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str((tmp_path / "x").resolve())
    assert not storage.is_remote(tmp_path) and not storage.is_remote("file:///tmp/x")
    fs, path = storage.resolve(f"{s3_bucket}/a/b/")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3_bucket[5:]}/a/b"
    # a URI that went through Path() gets its "//" back; local paths and file URIs are left alone
    assert storage.restore_uri(str(Path("s3://b/k/x.parquet"))) == "s3://b/k/x.parquet"
    assert storage.restore_uri("/tmp/a:/b") == "/tmp/a:/b" and storage.restore_uri("file:/x") == "file:/x"
    # the endpoint comes from the standard variable, the S3-specific one first
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    assert storage.s3_options()["endpoint_override"] == "127.0.0.1:1"


def test_write_read_list_on_s3(s3_bucket):  # noqa: F811
    storage.write_bytes(storage.join(s3_bucket, "d", "b.parquet"), b"2")
    storage.write_bytes(storage.join(s3_bucket, "d", "a.parquet"), b"1")
    storage.write_bytes(storage.join(s3_bucket, "d", ".hidden.parquet"), b"x")
    storage.write_bytes(storage.join(s3_bucket, "d", "sub", "c.parquet"), b"3")
    assert storage.list_files(storage.join(s3_bucket, "d"), ".parquet") == [
        f"{s3_bucket}/d/a.parquet",
        f"{s3_bucket}/d/b.parquet",
    ]
    assert storage.read_text(f"{s3_bucket}/d/b.parquet") == "2"
    assert storage.is_file(f"{s3_bucket}/d/a.parquet") and not storage.exists(f"{s3_bucket}/nothing")
    assert storage.list_files(f"{s3_bucket}/absent") == []


def _stage(folder: Path, version: str) -> dict[str, bytes]:
    files = {f"train/part-{i:05d}.parquet": f"{version}-shard-{i}".encode() * 1000 for i in range(5)}
    files["pairs/lfw.parquet"] = f"{version}-pairs".encode() * 100
    files["manifest.json"] = f'{{"version": "{version}"}}'.encode()
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


def _publish_killed_after(folder: Path, location: str, uploads: int) -> int:
    """Run publish_tree in a child process that SIGKILLs itself after `uploads` objects."""
    script = textwrap.dedent(f"""
        import os, signal
        from facepipe import storage
        real, done = storage._upload, []
        def upload(*args):
            real(*args)
            done.append(1)
            if len(done) == {uploads}:
                os.kill(os.getpid(), signal.SIGKILL)
        storage._upload = upload
        storage.publish_tree({str(folder)!r}, {location!r}, "manifest.json")
    """)
    return subprocess.run([sys.executable, "-c", script], timeout=60).returncode


def _remote_files(location: str) -> dict[str, bytes]:
    fs, root = storage.resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {  # the published files, without the upload ledger
        i.path[len(root) + 1 :]: storage.read_bytes(f"s3://{i.path}")
        for i in infos
        if i.type == pafs.FileType.File and f"/{storage.PUBLISH_LEDGER}/" not in i.path
    }


def test_publish_killed_mid_upload_looks_incomplete_and_rerun_completes(s3_bucket, tmp_path):  # noqa: F811
    from facepipe.data.shards import read_manifest

    location = f"{s3_bucket}/shards"
    files = _stage(tmp_path / "v1", "v1")
    assert _publish_killed_after(tmp_path / "v1", location, 3) == -9
    partial = _remote_files(location)
    assert len(partial) == 3 and "manifest.json" not in partial
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(location)

    counts = storage.publish_tree(tmp_path / "v1", location, "manifest.json")
    assert counts == {"uploaded": len(files) - 3, "skipped": 3}
    assert _remote_files(location) == files
    assert read_manifest(location) == {"version": "v1"}

    # republishing over a complete location: the old manifest goes before any new object arrives
    v2 = _stage(tmp_path / "v2", "v2-longer")
    assert _publish_killed_after(tmp_path / "v2", location, 1) == -9
    assert "manifest.json" not in _remote_files(location)
    counts = storage.publish_tree(tmp_path / "v2", location, "manifest.json")
    assert read_manifest(location) == {"version": "v2-longer"}
    assert counts == {"uploaded": len(files) - 1, "skipped": 1}
    assert _remote_files(location) == v2

    # an object of the same size but other content (another publish's) is never taken as uploaded
    v3 = _stage(tmp_path / "v3", "v3-longer")
    assert _publish_killed_after(tmp_path / "v3", location, 1) == -9
    assert storage.publish_tree(tmp_path / "v3", location, "manifest.json")["skipped"] == 1
    assert _remote_files(location) == v3


def test_decode_and_feature_cache_on_s3_read_back_like_local(s3_bucket, tmp_path):  # noqa: F811
    from facepipe.data.decode.job import decode_dataset
    from facepipe.data.shards import iter_shard_batches, list_shards, pair_tables, read_manifest
    from facepipe.data.synth.generate import SynthConfig, generate

    generate(tmp_path / "raw", SynthConfig(identities=6, images_per_identity=4, pairs=20, size=32, seed=1))
    local = decode_dataset([tmp_path / "raw"], tmp_path / "local", target_bytes=20_000)
    remote = decode_dataset([tmp_path / "raw"], f"{s3_bucket}/shards", target_bytes=20_000)
    assert remote["_run"]["published"]["uploaded"] > 2 and remote["_run"]["published"]["skipped"] == 0
    assert read_manifest(f"{s3_bucket}/shards")["shards"] == local["shards"]
    local_shards, remote_shards = list_shards(tmp_path / "local"), list_shards(f"{s3_bucket}/shards")
    assert len(remote_shards) == len(local_shards) > 1
    assert all(u.startswith(f"{s3_bucket}/shards/train/part-") for u in remote_shards)
    assert list(pair_tables(f"{s3_bucket}/shards")) == list(pair_tables(tmp_path / "local"))
    got = [b.to_pydict() for b in iter_shard_batches(remote_shards, batch_rows=7)]
    want = [b.to_pydict() for b in iter_shard_batches(local_shards, batch_rows=7)]
    assert got == want

    # the training loader streams the bucket's row groups: the same batches as from local disk
    from facepipe.data.loader import ShardLoader

    def batches(paths: list) -> list[tuple]:
        with ShardLoader(paths, 8, (32, 32), seed=1, workers=1) as loader:
            return [(b.images.numpy(), b.labels.numpy()) for b in loader.epoch(1)]

    got, want = batches(remote_shards), batches(local_shards)
    assert len(got) == len(want) > 1
    for (images, labels), (images_local, labels_local) in zip(got, want, strict=True):
        np.testing.assert_array_equal(labels, labels_local)
        np.testing.assert_array_equal(images, images_local)

    # the feature cache: read from the bucket's shards, written to the bucket, reused, rebuilt
    import torch

    from facepipe.models.registry import build_backbone
    from facepipe.train.features import cache_features, cache_info, cached_shards, read_cached_rows

    torch.manual_seed(0)
    backbone = build_backbone("iresnet_tiny", embedding_size=16, input_size=[32, 32]).eval()
    here = cache_features(backbone, local_shards, tmp_path / "cache", (32, 32), "RGB", "fp-1")
    there = cache_features(backbone, remote_shards, f"{s3_bucket}/cache", (32, 32), "RGB", "fp-1")
    assert there == f"{s3_bucket}/cache" and cache_info(there) == cache_info(here)
    uris, paths = cached_shards(there), cached_shards(here)
    assert [u.rsplit("/", 1)[1] for u in uris] == [p.name for p in paths]
    shape = tuple(cache_info(here)["map_shape"])
    for uri, path in zip(uris, paths, strict=True):
        a, b = read_cached_rows(uri, 0, shape), read_cached_rows(str(path), 0, shape)
        np.testing.assert_allclose(a["embedding"], b["embedding"], rtol=1e-5, atol=1e-5)
    storage.write_bytes(f"{s3_bucket}/cache/features-00099.parquet", b"stale")
    cache_features(backbone, remote_shards, f"{s3_bucket}/cache", (32, 32), "RGB", "fp-1")  # reused
    assert len(cached_shards(there)) == len(uris) + 1
    cache_features(backbone, remote_shards, f"{s3_bucket}/cache", (32, 32), "RGB", "fp-2")  # rebuilt
    assert cache_info(there)["fingerprint"] == "fp-2" and len(cached_shards(there)) == len(uris)


def test_align_to_s3_publishes_what_a_local_run_writes_and_a_rerun_does_nothing(
    s3_bucket,  # noqa: F811
    tmp_path,
):
    from facepipe.data.align.job import AlignSettings, run_align
    from tests.unit.test_align import _make_folder

    src, marks = _make_folder(tmp_path)
    local = run_align(src, tmp_path / "local", AlignSettings(), landmarks_file=marks, chunk_size=5)
    remote = run_align(src, f"{s3_bucket}/aligned", AlignSettings(), landmarks_file=marks, chunk_size=5)
    assert remote["out"] == f"{s3_bucket}/aligned" and not remote["skipped"]
    assert remote["published"]["uploaded"] >= 4 and remote["published"]["skipped"] == 0
    for key in ("inputs", "aligned", "rejected", "classes", "shards"):
        assert remote[key] == local[key], key
    # the same files, byte for byte, with the manifest published last
    names = sorted(p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local").rglob("*"))
    files = [n for n in names if (tmp_path / "local" / n).is_file()]
    fs, root = storage.resolve(f"{s3_bucket}/aligned")
    listed = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    objects = [i.path[len(root) + 1 :] for i in listed if i.type == pafs.FileType.File]
    assert sorted(o for o in objects if not o.startswith(".published/")) == files
    for name in files:
        want = (tmp_path / "local" / name).read_bytes()
        if name != "manifest.json":  # the manifest records its own OUT and timings
            assert storage.read_bytes(f"{s3_bucket}/aligned/{name}") == want, name
    again = run_align(src, f"{s3_bucket}/aligned", AlignSettings(), landmarks_file=marks, chunk_size=5)
    assert again["skipped"] and again["aligned"] == local["aligned"]
    # another source against the published dataset is refused, as locally
    (src / "bob" / "000.jpg").unlink()
    with pytest.raises(Exception, match="already holds an aligned dataset"):
        run_align(src, f"{s3_bucket}/aligned", AlignSettings(), landmarks_file=marks, chunk_size=5)


def test_dvc_remote_on_s3_pushes_and_a_fresh_clone_pulls_the_same_files(
    s3_bucket,  # noqa: F811
    tmp_path,
):
    """The DVC remote on object storage: endpoint and keys from the standard AWS variables only."""
    from facepipe.orchestration.dvc import dvc, version_folder

    def git(*args: str, cwd: Path) -> None:
        subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)

    project = tmp_path / "project"
    (project / "data" / "raw").mkdir(parents=True)
    for i in range(3):
        (project / "data" / "raw" / f"part-{i}.bin").write_bytes(np.random.default_rng(i).bytes(4096))
    git("init", "-q", cwd=project)
    git("config", "user.email", "t@example.com", cwd=project)
    git("config", "user.name", "t", cwd=project)
    dvc(["init", "-q"], project)
    dvc(["remote", "add", "-d", "store", f"{s3_bucket}/dvc-store"], project)
    recorded = version_folder(project, "data/raw")
    assert recorded["nfiles"] == 3 and recorded["size"] == 3 * 4096
    fs, root = storage.resolve(f"{s3_bucket}/dvc-store")
    pushed = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    assert sum(i.type == pafs.FileType.File for i in pushed) == 4  # three files + the folder's listing

    git("add", "-A", cwd=project)
    git("commit", "-q", "-m", "data", cwd=project)
    shutil.rmtree(project / ".dvc" / "cache")  # only the bucket holds the data now
    clone = tmp_path / "clone"
    git("clone", "-q", str(project), str(clone), cwd=tmp_path)
    dvc(["pull", "-q"], clone)
    for i in range(3):
        name = f"data/raw/part-{i}.bin"
        assert (clone / name).read_bytes() == (project / name).read_bytes()
