"""`facepipe align` on bad input (issue 18): every entry under SRC lands in the shards or the rejects with a
reason (links, loops, FIFOs), links are never followed, image type by content, pixel bombs refused before
decoding, folder names that are not UTF-8."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.align_pixel_bomb import pixel_bomb_png
from facepipe.data.align.codec import encode_image
from facepipe.data.align.job import AlignSettings, run_align
from facepipe.fsutil import unescape_name
from tests.unit.test_align import ARCFACE, _dot_image, _make_folder, _read


def _rejects(out) -> dict[str, dict]:
    return {r["source_path"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist()}


def _landmark_line(rel: str) -> str:
    return f"{rel} " + " ".join(f"{v:.2f}" for v in ARCFACE.ravel())


def _gif_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(_dot_image(ARCFACE)[:, :, ::-1]).save(buffer, "GIF")
    return buffer.getvalue()


@pytest.mark.timeout(120)  # a FIFO opened for reading would block forever
def test_links_loops_and_fifos_each_land_in_rejects_and_links_are_not_followed(tmp_path):
    src, marks = _make_folder(tmp_path, identities=("alice", "bob"), per_identity=2, extra=False)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "photo.jpg").write_bytes((src / "alice" / "000.jpg").read_bytes())
    os.symlink("loop.jpg", src / "alice" / "loop.jpg")
    os.symlink("nowhere.jpg", src / "alice" / "dangling.jpg")
    os.mkfifo(src / "bob" / "fifo.jpg")
    os.symlink(outside / "photo.jpg", src / "bob" / "outside.jpg")
    os.symlink(src / "alice" / "000.jpg", src / "bob" / "inside.jpg")
    os.symlink(outside, src / "bob" / "linked_folder")
    os.symlink(src / "alice", src / "zz_alias")  # a folder link back into SRC: not a second identity
    result = run_align(src, tmp_path / "out", AlignSettings(), landmarks_file=marks, contact_sheet=False)

    labels = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert labels == {"alice": 0, "bob": 1}
    assert result["aligned"] == 4 and result["inputs"] == result["aligned"] + result["rejected"] == 11
    rejects = _rejects(tmp_path / "out")
    details = {path: (r["reason"], r["detail"]) for path, r in rejects.items()}
    assert details["alice/loop.jpg"] == ("symlink", "link to loop.jpg loops")
    assert details["alice/dangling.jpg"] == ("symlink", "link to nowhere.jpg dangles")
    assert details["bob/fifo.jpg"] == ("not_a_file", "a FIFO, not a regular file")
    assert details["bob/outside.jpg"][0] == "symlink" and "leaves SRC" in details["bob/outside.jpg"][1]
    assert details["bob/inside.jpg"][0] == "symlink" and "back into SRC" in details["bob/inside.jpg"][1]
    assert "leaves SRC" in details["bob/linked_folder"][1]
    assert details["zz_alias"][0] == "symlink" and "back into SRC" in details["zz_alias"][1]
    assert sorted(_read(tmp_path / "out")["source_path"].to_pylist()) == [
        "alice/000.jpg", "alice/001.jpg", "bob/000.jpg", "bob/001.jpg"
    ]  # fmt: skip


def test_image_type_is_decided_by_content_not_name(tmp_path):
    src, marks = _make_folder(tmp_path, identities=("a",), per_identity=1, extra=False)
    gif = _gif_bytes()
    png = encode_image(_dot_image(ARCFACE), "png")
    files = {
        "a/x.gif": gif,
        "a/x_gif.jpg": gif,
        "a/png.gif": png,
        "a/jpeg.txt": (src / "a" / "000.jpg").read_bytes(),
    }
    files["a/text.jpg"] = b"plain text, not an image"
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    marks.write_text(marks.read_text() + "".join(_landmark_line(rel) + "\n" for rel in files))
    result = run_align(src, tmp_path / "out", AlignSettings(), landmarks_file=marks, contact_sheet=False)
    rejects = _rejects(tmp_path / "out")
    assert list(rejects) == ["a/text.jpg"] and rejects["a/text.jpg"]["reason"] == "not_an_image"
    assert result["aligned"] == 5
    rows = {r["source_path"]: r["image"] for r in _read(tmp_path / "out").to_pylist()}
    assert rows["a/x.gif"] == rows["a/x_gif.jpg"]  # the same bytes, the same crop, whatever the name


def test_pixel_bomb_is_refused_from_its_header(tmp_path, monkeypatch):
    import cv2

    src, marks = _make_folder(tmp_path, identities=("a",), per_identity=2, extra=False)
    bomb = pixel_bomb_png()
    assert len(bomb) < 200_000
    (src / "a" / "bomb.png").write_bytes(bomb)
    marks.write_text(marks.read_text() + _landmark_line("a/bomb.png") + "\n")
    sizes = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: sizes.append(len(buf)) or real(buf, flags))
    result = run_align(src, tmp_path / "out", AlignSettings(), landmarks_file=marks, contact_sheet=False)
    assert result["aligned"] == 2 and len(bomb) not in sizes  # never handed to the decoder
    reject = _rejects(tmp_path / "out")["a/bomb.png"]
    assert reject["reason"] == "too_large" and "30000x30000 = 900000000 pixels" in reject["detail"]
    small = AlignSettings(max_pixels=100 * 100)  # the limit is configurable
    run_align(src, tmp_path / "small", small, landmarks_file=marks, contact_sheet=False)
    assert {r["reason"] for r in _rejects(tmp_path / "small").values()} == {"too_large"}


def test_identity_folder_name_that_is_not_utf8(tmp_path):
    src, marks = _make_folder(tmp_path, identities=("a",), per_identity=1, extra=False)
    name = b"jos\xe9"
    folder = os.path.join(os.fsencode(src), name)
    os.mkdir(folder)
    with open(os.path.join(folder, b"000.jpg"), "wb") as handle:
        handle.write((src / "a" / "000.jpg").read_bytes())
    with open(marks, "ab") as handle:  # the landmark file names it by the same bytes
        handle.write(name + b"/" + _landmark_line("000.jpg").encode())
    result = run_align(src, tmp_path / "out", AlignSettings(), landmarks_file=marks, contact_sheet=False)
    assert result["aligned"] == 2 and result["rejected"] == 0
    raw = (tmp_path / "out" / "labels.json").read_bytes()
    labels = json.loads(raw.decode("utf-8"))  # strict UTF-8, no lone surrogates
    assert "\\ud" not in raw.decode() and sorted(labels.values()) == [0, 1]
    assert {unescape_name(key): label for key, label in labels.items()} == {b"a": 0, name: 1}
    rows = _read(tmp_path / "out")
    assert np.isin(1, rows["label"].to_numpy())
    # the shards keep each image's original path losslessly too
    sources = rows["source_path"].to_pylist()
    assert sorted(unescape_name(p) for p in sources) == [b"a/000.jpg", name + b"/000.jpg"]
