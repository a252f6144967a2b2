"""`facepipe decode` on bad input (issue 18): exact file offsets, --skip-bad never stopping on one record,
nothing silently dropped, names that are not UTF-8, duplicate index keys, pixel bombs with --validate."""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facepipe.cli import main
from facepipe.data.decode.coverage import UNINDEXED_KEY
from facepipe.data.decode.job import decode_dataset
from facepipe.data.formats import recordio as rio
from facepipe.errors import DataError
from facepipe.fsutil import unescape_name
from tests.unit.test_decode import make_classes, make_source, write_flat_set


def offsets_of(src: Path) -> dict[int, int]:
    keys, offsets = rio.read_index(src / "train.idx")
    return dict(zip(keys.tolist(), offsets.tolist(), strict=True))


def damage(src: Path, key: int, how: str) -> int:
    """Damage record `key` in place (bad magic, or a length running past the next record); its offset."""
    offset = offsets_of(src)[key]
    data = bytearray((src / "train.rec").read_bytes())
    if how == "magic":
        data[offset] ^= 0x55
    else:
        data[offset + 4 : offset + 8] = struct.pack("<I", 1 << 20)  # cflag 0, 1 MiB
    (src / "train.rec").write_bytes(bytes(data))
    return offset


def reported_offsets(text: str) -> set[int]:
    return {int(m) for m in re.findall(r"offset (\d+)", text)}


def rejects(out: Path) -> list[dict]:
    return pq.read_table(out / "rejects.parquet").to_pylist()


# ----------------------------------------------------------------------------------- 1. file offsets


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.integers(2, 29),
    how=st.sampled_from(["magic", "length"]),
    target_bytes=st.sampled_from([3_000, 8_000, 1 << 20]),
    row_group_bytes=st.sampled_from([1_500, 4_000, 1 << 20]),
    skip_bad=st.booleans(),
)
def test_every_reported_offset_is_the_records_offset_in_the_file(
    key, how, target_bytes, row_group_bytes, skip_bad
):
    # the record falls in a later range and a later chunk of it: offsets must still be the file's
    with tempfile.TemporaryDirectory() as tmp:
        src = make_source(Path(tmp) / "src", pairs=0)
        offset = damage(src, key, how)
        kwargs = {"target_bytes": target_bytes, "row_group_bytes": min(row_group_bytes, target_bytes)}
        if not skip_bad:
            with pytest.raises(DataError) as caught:
                decode_dataset([src], Path(tmp) / "out", workers=1, **kwargs)
            assert f"record {key} at offset {offset}" in str(caught.value)
            assert reported_offsets(str(caught.value)) == {offset}
            return
        decode_dataset([src], Path(tmp) / "out", workers=1, skip_bad=True, **kwargs)
        (reject,) = rejects(Path(tmp) / "out")
        assert reject["key"] == key and reported_offsets(reject["reason"]) == {offset}
        assert reject["offset"] == offset  # the rejects table's own column, whatever the reason says


# ------------------------------------------------------------------ 2. --skip-bad never stops on one


@pytest.mark.parametrize("layout", ["header", "flat"])
def test_a_damaged_first_record_does_not_stop_skip_bad(tmp_path, layout):
    if layout == "header":
        src, first = make_source(tmp_path / "src", pairs=0), 1
    else:
        images = [im for c in make_classes(3, 4) for im in c]
        src, first = write_flat_set(tmp_path / "flat", images, per_class=4), 0  # no property file
    offset = damage(src, first, "magic")
    manifest = decode_dataset([src], tmp_path / "out", workers=1, skip_bad=True)
    assert [r["key"] for r in rejects(tmp_path / "out")] == [first]
    assert manifest["sources"][0]["label_convention"] == "scalar"  # learnt from the next record
    assert manifest["image_size"] == [32, 32]
    with pytest.raises(DataError, match=rf"bad magic 0x\w+ at offset {offset} .*record {first}"):
        decode_dataset([src], tmp_path / "strict", workers=1)


def test_all_bad_input_ends_with_empty_set_full_rejects_and_nonzero_exit(tmp_path, capsys):
    src = make_source(tmp_path / "src", n_classes=2, per_class=3, pairs=0)
    for key in range(1, 7):
        damage(src, key, "magic")
    out = tmp_path / "out"
    assert main(["decode", str(src), str(out), "--skip-bad", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "every record was rejected (6" in err and "rejects.parquet" in err and "Traceback" not in err
    assert sorted(r["key"] for r in rejects(out)) == [1, 2, 3, 4, 5, 6]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_images"] == 0 and manifest["rejects"]["count"] == 6


# ------------------------------------------------------------------------ 3. nothing silently dropped


def test_empty_index_beside_records(tmp_path, capsys):
    src = make_source(tmp_path / "src", n_classes=2, per_class=2, pairs=0)
    indexed = offsets_of(src)
    records = len(indexed)
    (src / "train.idx").write_text("")
    with pytest.raises(DataError, match=r"index lists fewer records than the file holds.*offset 0"):
        decode_dataset([src], tmp_path / "out", workers=1)
    assert main(["decode", str(src), str(tmp_path / "skip"), "--skip-bad"]) == 2
    found = rejects(tmp_path / "skip")
    assert len(found) == records and {r["key"] for r in found} == {UNINDEXED_KEY}
    assert sorted(r["offset"] for r in found) == sorted(indexed.values())  # each record, where it starts
    assert "training set is empty" in capsys.readouterr().err


def test_empty_rec_and_index(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.rec").write_bytes(b"")
    (src / "train.idx").write_text("")
    with pytest.raises(DataError, match=r"empty: there is nothing to decode.*train\.rec"):
        decode_dataset([src], tmp_path / "out", workers=1, skip_bad=True)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dropped=st.sets(st.integers(0, 11), min_size=1, max_size=6),
    row_group_bytes=st.sampled_from([2_000, 1 << 20]),
)
def test_every_unindexed_record_is_reported(dropped, row_group_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        images = [im for c in make_classes(3, 4) for im in c]
        src = write_flat_set(Path(tmp) / "flat", images, per_class=4)
        (src / "property").write_text("3,32,32\n")
        offsets = offsets_of(src)
        lines = (src / "train.idx").read_text().splitlines()
        (src / "train.idx").write_text(
            "".join(f"{line}\n" for k, line in enumerate(lines) if k not in dropped)
        )
        kept = sorted(set(range(12)) - dropped)
        if not kept:
            return
        with pytest.raises(DataError, match="fewer records than the file holds") as caught:
            decode_dataset([src], Path(tmp) / "out", workers=1, row_group_bytes=row_group_bytes)
        assert min(reported_offsets(str(caught.value))) == offsets[min(dropped)]
        manifest = decode_dataset(
            [src], Path(tmp) / "skip", workers=1, skip_bad=True, row_group_bytes=row_group_bytes
        )
        found = [r for r in rejects(Path(tmp) / "skip") if r["key"] == UNINDEXED_KEY]
        assert sorted(o for r in found for o in reported_offsets(r["reason"])) == sorted(
            offsets[k] for k in dropped
        )
        assert manifest["num_images"] == len(kept)


@pytest.mark.parametrize("where", ["after_header", "before_first"])
def test_records_outside_the_image_ranges_are_not_dropped(tmp_path, where):
    src = make_source(tmp_path / "src", n_classes=2, per_class=2, pairs=0)
    extra = rio.encode_frames(rio.pack(rio.IRHeader(0, 0.0, 99, 0), make_classes(1, 1, seed=3)[0][0]))
    data = (src / "train.rec").read_bytes()
    if where == "after_header":  # RecBuilder writes the header record last: this follows it
        (src / "train.rec").write_bytes(data + extra)
        offset = len(data)
    else:  # everything indexed moves back by the new record
        (src / "train.rec").write_bytes(extra + data)
        lines = [line.split() for line in (src / "train.idx").read_text().splitlines()]
        (src / "train.idx").write_text("".join(f"{k}\t{int(o) + len(extra)}\n" for k, o in lines))
        offset = 0
    with pytest.raises(DataError, match=rf"fewer records than the file holds: bytes at offset {offset} "):
        decode_dataset([src], tmp_path / "out", workers=1)
    manifest = decode_dataset([src], tmp_path / "skip", workers=1, skip_bad=True)
    (reject,) = rejects(tmp_path / "skip")
    assert reject == {
        "source": "src",
        "key": UNINDEXED_KEY,
        "reason": f"record at offset {offset} is not in the index",
        "offset": offset,
    }
    assert manifest["num_images"] == 4


def test_duplicate_index_key_names_the_key_and_both_lines(tmp_path):
    src = make_source(tmp_path / "src", pairs=0)
    lines = (src / "train.idx").read_text().splitlines()
    lines.insert(9, lines[3])  # key of line 4 again, as line 10
    (src / "train.idx").write_text("\n".join(lines) + "\n")
    key = lines[3].split()[0]
    with pytest.raises(DataError, match=rf"lists key {key} more than once, on lines 4 and 10"):
        decode_dataset([src], tmp_path / "out", workers=1)


# --------------------------------------------------------------------------- 4. names that are not UTF-8


def test_source_folder_name_that_is_not_utf8(tmp_path, capsys):
    name = os.fsdecode(b"caf\xe9-set")
    src = make_source(tmp_path / name, n_classes=2, per_class=2, pairs=2)
    out = tmp_path / "out"
    assert main(["decode", str(src), str(out), "--workers", "1"]) == 0
    text = (out / "manifest.json").read_text(encoding="utf-8")
    assert "\\ud" not in text  # no lone-surrogate escapes: strict JSON readers accept it
    manifest = json.loads(text)
    dataset = manifest["sources"][0]["dataset"]
    assert unescape_name(dataset) == b"caf\xe9-set"
    rows = pq.read_table(out / "train").column("dataset").to_pylist()
    assert set(rows) == {dataset}


# ----------------------------------------------------------------------------- 8. pixel bombs, --validate


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares `width` x `height` (8-bit RGB) with a few bytes of (truncated) data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    )
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_validate_refuses_a_pixel_bomb_before_decoding(tmp_path, monkeypatch):
    import cv2

    images = [im for c in make_classes(2, 3) for im in c]
    images[4] = png_header_only(30000, 30000)
    src = write_flat_set(tmp_path / "flat", images, per_class=3)
    decoded = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: decoded.append(len(buf)) or real(buf, flags))
    with pytest.raises(DataError, match=r"30000x30000 = 900000000 pixels.*record 4 at offset"):
        decode_dataset([src], tmp_path / "out", workers=1, validate=True)
    assert len(images[4]) not in decoded
    decode_dataset([src], tmp_path / "skip", workers=1, validate=True, skip_bad=True, max_pixels=10**9)
    assert [r["key"] for r in rejects(tmp_path / "skip")] == [4]  # under the limit: decoded, and fails
    assert rejects(tmp_path / "skip")[0]["reason"] == "undecodable image"
    assert np.isin(len(images[4]), decoded)
