"""InsightFace training-set layout: both conventions, byte-exact writer, inconsistent headers refused."""

from __future__ import annotations

import json

import pytest

from facepipe.data.formats import recordio as rio
from facepipe.data.formats.insightface import (
    find_training_files,
    open_training_set,
    read_property,
    write_training_set,
)
from facepipe.errors import DataError


def expected(recordio_dir, name):
    return json.loads((recordio_dir / f"{name}.expected.json").read_text())


@pytest.mark.parametrize(
    ("name", "convention", "header"), [("tiny_train", "scalar", (61, 73)), ("f2r_train", "array", (9, 13))]
)
def test_reads_both_conventions(recordio_dir, name, convention, header):
    exp = expected(recordio_dir, name)
    ts = open_training_set(recordio_dir / f"{name}.rec")
    assert ts.layout == "header" and ts.header == header and ts.label_convention == convention
    assert ts.num_classes == exp["num_classes"]
    assert ts.image_size == (112, 112)
    assert list(exp["header_record"]["labels"]) == list(header)
    ranges = [
        {
            "class": c,
            "identity_record_key": header[0] + c,
            "first_image_key": int(s),
            "end_image_key_exclusive": int(e),
        }
        for c, (s, e) in enumerate(zip(ts.identity_starts, ts.identity_ends, strict=True))
    ]
    assert ranges == exp["identity_ranges"]
    assert ts.image_keys.tolist() == [int(k) for k in exp["image_class_by_key"]]
    if "image_keys" in exp:  # [first, end)
        assert ts.image_keys.tolist() == list(range(*exp["image_keys"]))
    if "property_file" in exp:
        assert ts.property_path.read_text() == exp["property_file"]
    with rio.IndexedRecordFile(ts.rec_path, ts.idx_path) as rec:
        labels = {str(k): int(rio.header_label(rec.read_header(k)[0])) for k in ts.image_keys.tolist()}
    assert labels == exp["image_class_by_key"]


def test_property_file(recordio_dir):
    assert read_property(recordio_dir / "property") == (12, 112, 112)
    assert read_property(recordio_dir / "f2r_train.property") == (4, 112, 112)
    assert find_training_files(recordio_dir / "f2r_train.rec")[2].name == "f2r_train.property"


def _class_payloads(recordio_dir, name):
    exp = expected(recordio_dir, name)
    with rio.IndexedRecordFile(recordio_dir / f"{name}.rec", recordio_dir / f"{name}.idx") as rec:
        classes = []
        for r in exp["identity_ranges"]:
            keys = range(r["first_image_key"], r["end_image_key_exclusive"])
            classes.append([rec.read_header(k)[1] for k in keys])
    return classes


def test_writer_reproduces_recbuilder_bytes(recordio_dir, tmp_path):
    info = write_training_set(tmp_path, iter(_class_payloads(recordio_dir, "tiny_train")))
    assert info["num_images"] == 60 and info["num_classes"] == 12
    assert (tmp_path / "train.rec").read_bytes() == (recordio_dir / "tiny_train.rec").read_bytes()
    assert (tmp_path / "train.idx").read_bytes() == (recordio_dir / "tiny_train.idx").read_bytes()
    assert (tmp_path / "property").read_bytes() == (recordio_dir / "property").read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_writer_reproduces_face2rec2_bytes(recordio_dir, tmp_path):
    classes = _class_payloads(recordio_dir, "f2r_train")
    write_training_set(tmp_path, classes, prefix="f2r_train", convention="face2rec2")
    for suffix in (".rec", ".idx", ".property"):
        assert (tmp_path / f"f2r_train{suffix}").read_bytes() == (
            recordio_dir / f"f2r_train{suffix}"
        ).read_bytes()


def _write_layout(folder, image_labels, identities, header=None, prop=None):
    """Hand-built training set: image keys 1..n with `image_labels`, identity records, header at key 0."""
    folder.mkdir(parents=True, exist_ok=True)
    a = len(image_labels) + 1
    with rio.IndexedRecordWriter(folder / "train.rec", folder / "train.idx") as w:
        for key, label in enumerate(image_labels, start=1):
            w.write(key, rio.pack(rio.IRHeader(0, float(label), key, 0), b"\xff\xd8img"))
        for c, (first, end) in enumerate(identities):
            w.write(a + c, rio.pack(rio.IRHeader(0, [float(first), float(end)], a + c, 0), b""))
        hdr = header or (a, a + len(identities))
        w.write(0, rio.pack(rio.IRHeader(0, [float(hdr[0]), float(hdr[1])], 0, 1), b""))
    if prop:
        (folder / "property").write_text(prop)
    return folder


def test_overlapping_identity_ranges_refused(tmp_path):
    src = _write_layout(tmp_path / "d", [0, 0, 1, 1], [(1, 4), (3, 5)])
    with pytest.raises(DataError, match=r"overlaps.*record 6"):
        open_training_set(src)


def test_identity_range_beyond_images_refused(tmp_path):
    src = _write_layout(tmp_path / "d", [0, 0, 1, 1], [(1, 3), (3, 9)])
    with pytest.raises(DataError, match="identity range"):
        open_training_set(src)


def test_header_naming_missing_keys_refused(tmp_path):
    src = _write_layout(tmp_path / "d", [0, 0], [(1, 3)], header=(5, 6))
    with pytest.raises(DataError, match="not in the index"):
        open_training_set(src)


def test_property_disagreeing_with_identities_refused(tmp_path):
    src = _write_layout(tmp_path / "d", [0, 0, 1], [(1, 3), (3, 4)], prop="5,112,112\n")
    with pytest.raises(DataError, match="property says 5 classes"):
        open_training_set(src)


def test_flat_layout_without_header(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    with rio.IndexedRecordWriter(src / "train.rec", src / "train.idx") as w:
        for key in (0, 1, 2):  # newer rec_builder: images from key 0, no header/identities
            w.write(key, rio.pack(rio.IRHeader(0, float(key // 2), key, 0), b"\xff\xd8x"))
    ts = open_training_set(src)
    assert ts.layout == "flat" and ts.image_keys.tolist() == [0, 1, 2] and ts.num_classes is None


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_training_set(tmp_path / "nope")
    (tmp_path / "a.rec").write_bytes(b"")
    with pytest.raises(DataError, match="index file is missing"):
        open_training_set(tmp_path / "a.rec")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "property").write_text("twelve\n")
    with pytest.raises(DataError, match="classes,height,width"):
        read_property(tmp_path / "bad" / "property")
