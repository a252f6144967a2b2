"""Unit tests of the pieces of `facepipe decode`: vectorised parsing, planning, source-hash cache."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import xxhash

from facepipe.data.decode import resume as decode_resume
from facepipe.data.decode.hashing import AppendHasher, hash_mapped, sha256_mapped
from facepipe.data.decode.parse import check_labels, parse_chunk
from facepipe.data.decode.plan import plan_ranges, record_ends
from facepipe.data.formats.recordio import MAGIC_BYTES, IRHeader, encode_frames, pack
from facepipe.errors import DataError
from facepipe.fsutil import sha256_file


def _records() -> list[tuple[IRHeader, bytes]]:
    return [
        (IRHeader(0, 3.0, 1, 0), b"\xff\xd8plain jpeg-ish payload"),
        # the magic word at an aligned offset: written as several frames, the slow path
        (IRHeader(0, 4.0, 2, 0), b"abcd" * 2 + MAGIC_BYTES + b"tail" + MAGIC_BYTES),
        (IRHeader(2, [5.0, 1.0], 3, 0), b"face2rec2 style, two labels"),
        (IRHeader(0, 6.0, 4, 0), b""),  # empty payload: a real record, rejected as an image
        (IRHeader(0, 7.0, 5, 0), bytes(range(256)) * 3),
    ]


def _file(records) -> tuple[bytes, np.ndarray]:
    blob, offsets = b"", []
    for header, payload in records:
        offsets.append(len(blob))
        blob += encode_frames(pack(header, payload))
    return blob, np.array(offsets, np.int64)


def test_parse_chunk_matches_unpack_on_fast_and_slow_paths():
    records = _records()
    blob, offsets = _file(records)
    ends = np.append(offsets[1:], len(blob))
    keys = np.arange(1, len(records) + 1, dtype=np.int64)
    parsed = parse_chunk(memoryview(blob), offsets, 0, ends, len(blob), keys, "x.rec")
    region = memoryview(blob)
    # the multi-frame record leaves the vectorised path (so does the empty one: shorter than it checks)
    assert set(parsed.slow) <= {1, 3} and 1 in parsed.slow
    assert parsed.reasons == {3: "image record has an empty payload"}
    for i, (header, payload) in enumerate(records):
        assert bytes(parsed.payload(i, region)) == payload
        first = header.label if header.flag == 0 else header.label[0]
        assert parsed.labels[i] == first


def test_parse_chunk_reports_bad_records():
    records = _records()[:3]
    blob, offsets = _file(records)
    damaged = bytearray(blob)
    damaged[offsets[2]] ^= 0xFF  # bad magic on the third record
    offsets = np.append(offsets, len(blob) + 64)  # an index entry past the end of the file
    ends = np.append(offsets[1:3], [len(blob), len(blob)])
    keys = np.arange(4, dtype=np.int64)
    parsed = parse_chunk(
        memoryview(bytes(damaged)), offsets, 0, np.minimum(ends, len(blob)), len(blob), keys, "x"
    )
    assert set(parsed.reasons) == {2, 3}
    assert "magic" in parsed.reasons[2]
    assert "past the end of the file" in parsed.reasons[3]


def test_check_labels_against_identity_ranges():
    task = {
        "num_classes": 3,
        "identity_starts": np.array([1, 4], np.int64),
        "identity_ends": np.array([4, 6], np.int64),
        "identity_base": 1,  # this range's identities are classes 1 and 2
    }
    keys = np.array([1, 2, 4, 5, 7], np.int64)
    labels = np.array([1.0, 2.0, 2.0, 3.0, 2.0])
    reasons: dict[int, str] = {}
    check_labels(task, keys, labels, reasons)
    assert sorted(reasons) == [1, 3, 4]
    assert "disagrees" in reasons[1] and "not a class index" in reasons[3] and "no identity" in reasons[4]


def test_plan_is_contiguous_and_bounded():
    rng = np.random.default_rng(0)
    sizes = rng.integers(100, 5000, 500)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    ends = record_ends(offsets, int(sizes.sum()), offsets)
    assert np.array_equal(ends - offsets, sizes)
    ranges = plan_ranges(offsets, ends, 50_000)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(offsets)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(sizes[lo:hi].sum() < 50_000 + 5000 for lo, hi in ranges)
    assert plan_ranges(offsets[:0], ends[:0], 10) == []


@pytest.mark.parametrize("size", [0, 1, 4095, 3 * 4096 + 7])
def test_mapped_hash_equals_plain_hash(tmp_path, size):
    path = tmp_path / "f"
    data = os.urandom(size)
    path.write_bytes(data)
    assert sha256_mapped(path, window=4096) == sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert hash_mapped(path, "xxh3_128", window=4096) == xxhash.xxh3_128(data).hexdigest()
    with pytest.raises(DataError, match="unknown source hash 'md5'"):
        hash_mapped(path, "md5")


def _counting_hasher(monkeypatch) -> list:
    calls = []
    real = decode_resume.hash_mapped

    def counting(path, algorithm, stop=None):
        calls.append((path, algorithm))
        return real(path, algorithm, stop)

    monkeypatch.setattr(decode_resume, "hash_mapped", counting)
    return calls


def _hash_sources(files, done_dir, algorithm) -> tuple[dict, int]:
    hasher = decode_resume.SourceHasher(files, done_dir, algorithm)
    hasher.start()
    return hasher.wait(), hasher.cache_hits


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_source_hashes_are_cached_until_the_file_changes(tmp_path, monkeypatch, algorithm):
    src = tmp_path / "train.rec"
    src.write_bytes(b"some records")
    calls = _counting_hasher(monkeypatch)
    expected = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}[algorithm]

    first, hits = _hash_sources([src], tmp_path, algorithm)
    assert first == {str(src): {"size": 12, algorithm: expected(b"some records").hexdigest()}} and hits == 0
    assert _hash_sources([src], tmp_path, algorithm) == (first, 1) and len(calls) == 1  # from OUT/.decode
    src.write_bytes(b"other record")  # same size, new content and mtime
    os.utime(src, ns=(1, 1))
    again, hits = _hash_sources([src], tmp_path, algorithm)
    assert again[str(src)][algorithm] == expected(b"other record").hexdigest() and hits == 0
    assert len(calls) == 2


def test_source_hash_cache_is_kept_per_algorithm(tmp_path, monkeypatch):
    src = tmp_path / "train.rec"
    src.write_bytes(b"records")
    calls = _counting_hasher(monkeypatch)
    fast, _ = _hash_sources([src], tmp_path, "xxh3_128")
    assert fast[str(src)] == {"size": 7, "xxh3_128": xxhash.xxh3_128(b"records").hexdigest()}
    # a change of algorithm never takes the other one's entry
    strong, hits = _hash_sources([src], tmp_path, "sha256")
    assert strong[str(src)] == {"size": 7, "sha256": hashlib.sha256(b"records").hexdigest()} and hits == 0
    assert calls == [(src, "xxh3_128"), (src, "sha256")]
    # both stay cached side by side
    assert _hash_sources([src], tmp_path, "xxh3_128") == (fast, 1)
    assert _hash_sources([src], tmp_path, "sha256") == (strong, 1) and len(calls) == 2


def test_source_hash_cache_of_the_old_format_is_not_trusted(tmp_path):
    # version 1 kept {path: {size, mtime_ns, inode, sha256}}: never read as another algorithm's digest
    src = tmp_path / "train.rec"
    src.write_bytes(b"records")
    stat = src.stat()
    old = {str(src): {"size": 7, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino, "sha256": "f" * 64}}
    (tmp_path / decode_resume.SOURCE_HASH_CACHE).write_text(json.dumps(old))
    for algorithm, expected in (("sha256", hashlib.sha256), ("xxh3_128", xxhash.xxh3_128)):
        result, hits = _hash_sources([src], tmp_path, algorithm)
        assert result[str(src)][algorithm] == expected(b"records").hexdigest() and hits == 0


def test_append_hasher_follows_a_growing_file(tmp_path):
    path = tmp_path / "growing"
    path.write_bytes(b"")
    hasher = AppendHasher(path, window=8192)
    data = b""
    with open(path, "ab", buffering=0) as handle:
        for n in (0, 5, 4091, 10_000, 1, 70_000):  # stretches across mapping windows and page boundaries
            chunk = os.urandom(n)
            handle.write(chunk)
            data += chunk
            hasher.advance(len(data))
    assert hasher.finish(len(data)) == hashlib.sha256(data).hexdigest()


def test_binary_views_point_at_values_in_several_buffers():
    import pyarrow as pa

    from facepipe.data.decode.worker import binary_views

    rng = np.random.default_rng(0)
    buffers = [rng.integers(0, 256, 300, dtype=np.uint8), rng.integers(0, 256, 50, dtype=np.uint8)]
    # short values sit inline (<= 12 bytes, one at the very end of a buffer), long ones are referenced
    spans = [(0, 5, 40), (0, 0, 0), (1, 3, 12), (0, 100, 13), (1, 38, 12), (0, 299, 1), (1, 0, 50)]
    index, starts, lengths = (np.array(column) for column in zip(*spans, strict=True))
    views = binary_views(buffers, index.astype(np.int32), starts, lengths)
    array = pa.Array.from_buffers(
        pa.binary_view(), len(spans), [None, pa.py_buffer(views), *map(pa.py_buffer, buffers)]
    )
    array.validate(full=True)  # lengths, prefixes, buffer indices and offsets all consistent
    expected = [buffers[b][s : s + n].tobytes() for b, s, n in spans]
    assert array.to_pylist() == expected
    assert array.cast(pa.binary()).to_pylist() == expected


def test_mapped_source_hashes_the_whole_file_through_its_chunks(tmp_path):
    from facepipe.data.decode.worker import _MappedSource

    data = np.random.default_rng(1).integers(0, 256, 3 * 4096 + 123, dtype=np.uint8).tobytes()
    path = tmp_path / "x.rec"
    path.write_bytes(data)
    # chunks in file order with gaps (records of other kinds) before, between and after them
    with _MappedSource(str(path), "xxh3_128") as source:
        for offset, span in ((100, 2000), (2500, 5000), (7500, 10)):
            region, mapping = source.read(offset, span)
            assert bytes(region) == data[offset : offset + span]
            source.release(mapping)
        assert source.source_digest() == xxhash.xxh3_128(data).hexdigest()
    # a chunk that starts before the previous one ended: no digest, the file is hashed apart
    with _MappedSource(str(path), "sha256") as source:
        for offset, span in ((0, 4000), (3000, 2000)):
            source.release(source.read(offset, span)[1])
        assert source.source_digest() is None
    with _MappedSource(str(path)) as source:  # not asked to hash
        assert source.source_digest() is None


def test_source_handed_over_to_the_conversion(tmp_path, monkeypatch):
    """Files the conversion hashes come from it; the thread only checks the cache for them, and one the
    conversion could not hash (None) is hashed at the end."""
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    rec.write_bytes(b"records")
    idx.write_bytes(b"0\t0\n")
    calls = _counting_hasher(monkeypatch)
    done_dir = tmp_path / "done"
    done_dir.mkdir()

    def run(delivered):
        hasher = decode_resume.SourceHasher([rec, idx], done_dir, "sha256", handed_over={str(rec)})
        hasher.start()
        return hasher.wait(delivered), hasher.cache_hits

    hashes, hits = run({str(rec): "from-the-conversion"})
    assert hashes[str(rec)]["sha256"] == "from-the-conversion" and hits == 0
    assert [p for p, _ in calls] == [idx]  # the .rec was not read by the thread
    assert list(hashes) == [str(rec), str(idx)]  # file order, as the manifest lists them
    hashes, hits = run({})  # a rerun: both from the cache
    assert hits == 2 and hashes[str(rec)]["sha256"] == "from-the-conversion"
    rec.write_bytes(b"changed records")
    calls.clear()
    hashes, hits = run({str(rec): None})  # changed, and the conversion could not hash it
    assert hashes[str(rec)]["sha256"] == hashlib.sha256(b"changed records").hexdigest()
    assert [p for p, _ in calls] == [rec] and hits == 1
