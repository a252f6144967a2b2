"""RecordIO parity with files written by real MXNet, writer round-trips and bad-input errors."""

from __future__ import annotations

import hashlib
import json
import struct
import warnings

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facepipe.data.formats import recordio as rio
from facepipe.data.shards import decode_images
from facepipe.errors import DataError

INDEXED = ["tiny_train", "f2r_train", "multilabel"]
MEAN_TOLERANCE = 1.0  # per-channel mean; another libjpeg may round a few pixels differently


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def f32_hex(value: float) -> str:
    return struct.pack("<f", value).hex()


def load_expected(recordio_dir, name):
    return json.loads((recordio_dir / f"{name}.expected.json").read_text())


def check_decoded(payload: bytes, expected: dict, where: str) -> None:
    pixels = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    assert pixels is not None, where
    assert list(pixels.shape) == expected["decoded_shape_hwc"], where
    means = pixels.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(means, expected["decoded_mean_bgr"], atol=MEAN_TOLERANCE, err_msg=where)
    if sha(pixels.tobytes()) != expected["decoded_bgr_sha256_cv2"]:  # soft: depends on the JPEG decoder
        warnings.warn(f"{where}: decoded pixels differ from cv2 4.10's (another libjpeg?)", stacklevel=2)
    if expected.get("mx_imdecode_rgb_equals_cv2_bgr_reversed"):
        # what InsightFace's loaders feed the model (mx.image.imdecode: RGB) is what the shard reader gives
        np.testing.assert_array_equal(decode_images([payload], "RGB")[0], pixels[..., ::-1], err_msg=where)


def check_header_fields(record: bytes, expected: dict, where: str) -> None:
    header, payload = rio.unpack(record)
    assert header.flag == expected["flag"], where
    assert header.id == expected["id"], where
    assert header.id2 == expected["id2"], where
    raw_label = struct.unpack_from("<f", record, 4)[0]
    assert raw_label == expected["header_label_field"], where
    assert f32_hex(raw_label) == expected["header_label_field_f32_hex"], where
    if "labels" in expected:
        assert isinstance(header.label, np.ndarray) and header.label.dtype == np.float32, where
        assert header.label.tolist() == expected["labels"], where
        assert [v.tobytes().hex() for v in header.label] == expected["labels_f32_hex"], where
    else:
        assert not isinstance(header.label, np.ndarray), where
        assert header.label == expected["label"], where
        assert f32_hex(header.label) == expected["label_f32_hex"], where
    assert len(payload) == expected["payload_length"], where
    assert sha(payload) == expected["payload_sha256"], where
    kind = "empty" if not payload else ("jpeg" if payload[:2] == b"\xff\xd8" else "bytes")
    assert kind == expected["payload_kind"], where
    if kind == "jpeg":
        check_decoded(payload, expected, where)


def check_frames(raw: bytes, offset: int, expected_frames: list[dict], where: str) -> None:
    frames = rio.frames_of(raw, offset)
    got = [{"offset": o, "cflag": c, "length": n, "padded_length": (n + 3) // 4 * 4} for o, c, n in frames]
    assert got == expected_frames, where


@pytest.mark.parametrize("name", INDEXED)
def test_indexed_fixture_parity(recordio_dir, name):
    exp = load_expected(recordio_dir, name)
    rec_path, idx_path = recordio_dir / f"{name}.rec", recordio_dir / f"{name}.idx"
    raw = rec_path.read_bytes()
    assert len(raw) == exp["rec_file_size"]
    assert sha(raw) == exp["rec_file_sha256"]
    assert sha(idx_path.read_bytes()) == exp["idx_file_sha256"]
    with rio.IndexedRecordFile(rec_path, idx_path) as rec:
        assert [[k, rec.offset(k)] for k in rec.keys] == exp["idx_entries_in_file_order"]
        assert len(rec) == len(exp["records"])
        assert sorted(rec.keys, key=rec.offset) == exp["keys_in_physical_order"]
        for expected in exp["records"]:
            key = expected["key"]
            where = f"{name} key {key}"
            assert rec.offset(key) == expected["offset"], where
            record = rec.read(key)
            assert len(record) == expected["record_length"], where
            assert sha(record) == expected["record_sha256"], where
            check_frames(raw, expected["offset"], expected["frames"], where)
            check_header_fields(record, expected, where)


def test_plain_fixture_parity(recordio_dir):
    exp = load_expected(recordio_dir, "plain")
    raw = (recordio_dir / "plain.rec").read_bytes()
    assert len(raw) == exp["rec_file_size"] and sha(raw) == exp["rec_file_sha256"]
    records = list(rio.read_records(recordio_dir / "plain.rec"))
    assert len(records) == exp["num_records"] == len(exp["records"])
    split = []
    for record, expected in zip(records, exp["records"], strict=True):
        where = f"plain record {expected['index']}"
        assert len(record) == expected["record_length"], where
        assert sha(record) == expected["record_sha256"], where
        if "record_hex" in expected:
            assert record.hex() == expected["record_hex"], where
        check_frames(raw, expected["offset"], expected["frames"], where)
        frames = rio.frames_of(raw, expected["offset"])
        last_offset, _, last_length = frames[-1]
        assert last_offset + 8 + (last_length + 3) // 4 * 4 - expected["offset"] == expected["on_disk_bytes"]
        if len(frames) > 1:
            split.append(expected["index"])
        # random access at the recorded offset gives the same record
        assert rio.read_record_at(raw, expected["offset"], "plain.rec")[0] == record
        if "image_record" in expected:
            check_header_fields(record, expected["image_record"], where)
    assert split == exp["split_records"]
    assert records[0] == b""  # an empty record is a real record


def test_plain_writer_reproduces_mxnet_bytes(recordio_dir, tmp_path):
    exp = load_expected(recordio_dir, "plain")
    out = tmp_path / "plain.rec"
    with rio.RecordWriter(out) as writer:
        for record, expected in zip(
            rio.read_records(recordio_dir / "plain.rec"), exp["records"], strict=True
        ):
            assert writer.tell() == expected["offset"]
            assert writer.write(record) == expected["offset"]
    assert out.read_bytes() == (recordio_dir / "plain.rec").read_bytes()
    assert list(rio.read_records(out)) == list(rio.read_records(recordio_dir / "plain.rec"))


@pytest.mark.parametrize("name", INDEXED)
def test_indexed_writer_reproduces_mxnet_bytes(recordio_dir, tmp_path, name):
    exp = load_expected(recordio_dir, name)
    with (
        rio.IndexedRecordFile(recordio_dir / f"{name}.rec", recordio_dir / f"{name}.idx") as src,
        rio.IndexedRecordWriter(tmp_path / "out.rec", tmp_path / "out.idx") as writer,
    ):
        for key in exp["keys_in_physical_order"]:
            writer.write(key, src.read(key))
    assert (tmp_path / "out.rec").read_bytes() == (recordio_dir / f"{name}.rec").read_bytes()
    assert (tmp_path / "out.idx").read_bytes() == (recordio_dir / f"{name}.idx").read_bytes()


@pytest.mark.parametrize("name", INDEXED)
def test_pack_reproduces_mxnet_records(recordio_dir, name):
    """pack(unpack(r)) == r for every record MXNet's pack wrote (multilabel key 7 was hand-built)."""
    exp = load_expected(recordio_dir, name)
    with rio.IndexedRecordFile(recordio_dir / f"{name}.rec", recordio_dir / f"{name}.idx") as rec:
        for expected in exp["records"]:
            record = rec.read(expected["key"])
            header, payload = rio.unpack(record)
            repacked = rio.pack(header, payload)
            if name == "multilabel" and expected["key"] == 7:
                # pack writes 0.0 into the header label field when labels follow; MXNet's unpack ignores it
                assert repacked != record and rio.unpack(repacked)[0].label.tolist() == [11.0, 12.0]
                assert repacked[:4] + repacked[8:] == record[:4] + record[8:]
            else:
                assert repacked == record, expected["key"]


def test_pack_overrides_flag_like_mxnet():
    a = rio.pack(rio.IRHeader(2, [3.0, 1.0], 5, 0), b"xy")
    b = rio.pack(rio.IRHeader(0, [3.0, 1.0], 5, 0), b"xy")
    assert a == b and struct.unpack_from("<I", a)[0] == 2 and struct.unpack_from("<f", a, 4)[0] == 0.0
    one = rio.pack(rio.IRHeader(0, np.array([7.0]), 1, 0), b"")
    assert rio.unpack(one)[0].flag == 1 and rio.unpack(one)[0].label.tolist() == [7.0]
    scalar = rio.pack(rio.IRHeader(9, 4, 2**40 + 5, 7), b"p")
    header, payload = rio.unpack(scalar)
    assert header == rio.IRHeader(0, 4.0, 2**40 + 5, 7) and payload == b"p"
    assert rio.header_label(header) == 4.0
    assert rio.header_label(rio.unpack(a)[0]) == 3.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(st.binary(min_size=0, max_size=9), st.just(rio.MAGIC_BYTES), st.just(rio.MAGIC_BYTES * 2)),
        max_size=12,
    )
)
def test_magic_splitting_round_trip(tmp_path_factory, pieces):
    record = b"".join(pieces)
    path = tmp_path_factory.mktemp("rt") / "r.rec"
    with rio.RecordWriter(path) as writer:
        writer.write(record)
        writer.write(b"tail")
    raw = path.read_bytes()
    assert list(rio.read_records(path)) == [record, b"tail"]
    frames = rio.frames_of(raw, 0)
    aligned = [i for i in range(0, len(record) // 4 * 4, 4) if record[i : i + 4] == rio.MAGIC_BYTES]
    assert len(frames) == (len(aligned) + 1 if aligned else 1)
    assert [c for _, c, _ in frames] == ([0] if not aligned else [1] + [2] * (len(aligned) - 1) + [3])
    assert all(offset % 4 == 0 for offset, _, _ in frames)


# ------------------------------------------------------------------------------------------ bad input


def _write_three(tmp_path):
    with rio.IndexedRecordWriter(tmp_path / "t.rec", tmp_path / "t.idx") as writer:
        for key in range(3):
            writer.write(key, rio.pack(rio.IRHeader(0, float(key), key, 0), bytes([key]) * 100))
    return tmp_path / "t.rec", tmp_path / "t.idx"


def test_truncated_file_names_file_and_key(tmp_path):
    rec, idx = _write_three(tmp_path)
    data = rec.read_bytes()
    rec.write_bytes(data[:-50])
    with rio.IndexedRecordFile(rec, idx) as f:
        assert rio.unpack(f.read(1))[1] == b"\x01" * 100
        with pytest.raises(DataError, match=r"truncated.*file .*t\.rec.*record 2"):
            f.read(2)
    with pytest.raises(DataError, match="truncated"):
        list(rio.read_records(rec))


def test_bad_magic_names_file_and_key(tmp_path):
    rec, idx = _write_three(tmp_path)
    data = bytearray(rec.read_bytes())
    with rio.IndexedRecordFile(rec, idx) as f:
        offset = f.offset(1)
    data[offset] ^= 0xFF
    rec.write_bytes(bytes(data))
    with rio.IndexedRecordFile(rec, idx) as f, pytest.raises(DataError, match=r"bad magic.*record 1"):
        f.read(1)


def test_index_entry_past_end(tmp_path):
    rec, idx = _write_three(tmp_path)
    idx.write_text(idx.read_text() + "3\t999996\n")
    with rio.IndexedRecordFile(rec, idx) as f, pytest.raises(DataError, match=r"past the end.*record 3"):
        f.read(3)


def test_unknown_key_and_bad_index(tmp_path):
    rec, idx = _write_three(tmp_path)
    with rio.IndexedRecordFile(rec, idx) as f:
        assert 2 in f and 7 not in f
        with pytest.raises(DataError, match="not in the index"):
            f.read(7)
    idx.write_text("0\t0\n0\t112\n")
    with pytest.raises(DataError, match="more than once"):
        rio.IndexedRecordFile(rec, idx)
    idx.write_text("0\tzero\n")
    with pytest.raises(DataError, match="non-integer"):
        rio.IndexedRecordFile(rec, idx)


def test_unpack_rejects_short_records():
    with pytest.raises(DataError, match="shorter than"):
        rio.unpack(b"\0" * 10)
    with pytest.raises(DataError, match="flag 5"):
        rio.unpack(struct.pack("<IfQQ", 5, 0.0, 0, 0) + b"\0" * 8)


def test_empty_file(tmp_path):
    (tmp_path / "e.rec").write_bytes(b"")
    assert list(rio.read_records(tmp_path / "e.rec")) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"0", b"7", b"42", b"-3", b"9" * 19, b"9" * 20, b"1.5", b"x", b"1-2", b"+4",
                                 b" ", b"\t", b"\n", b"\r\n", b"\v"]), max_size=12))  # fmt: skip
def test_fast_index_parser_agrees_with_splitting(pieces):
    """numpy's text parser (the fast path) gives exactly what splitting into fields gives, or the same
    error: whatever it might misread goes the slow way."""
    data = b"".join(pieces)
    try:
        expected = np.array(data.split(), dtype=np.int64) if data.split() else np.zeros(0, np.int64)
    except (ValueError, OverflowError) as err:
        with pytest.raises(type(err)):
            rio._parse_index_text(data)
        return
    got = rio._parse_index_text(data)
    assert got.dtype == np.int64 and got.tolist() == expected.tolist()


def test_index_with_odd_or_huge_fields(tmp_path):
    rec, idx = _write_three(tmp_path)
    idx.write_text("0\t0\n1\n")
    with pytest.raises(DataError, match="without a key and an offset"):
        rio.IndexedRecordFile(rec, idx)
    idx.write_text(f"0\t0\n{10**20}\t4\n")
    with pytest.raises(DataError, match="non-integer"):
        rio.IndexedRecordFile(rec, idx)
