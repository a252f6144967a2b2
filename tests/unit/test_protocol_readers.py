"""Readers of the release layouts (LFW, IJB-B/C, YTF): files written in each release's exact format, the
real LFW photos + pairs.txt + landmark file of the shared fixtures, and one error naming file and line."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from facepipe.data.align.geometry import align_face
from facepipe.data.formats.landmarks import load_landmarks
from facepipe.data.protocols.ijb import read_ijb
from facepipe.data.protocols.lfw import read_lfw
from facepipe.data.protocols.ytf import read_ytf
from facepipe.errors import DataError

LFW_NAMES = [
    "Anthony_Hopkins_0001",
    "Anthony_Hopkins_0002",
    "Nathalie_Baye_0002",
    "Rob_Lowe_0001",
    "Rob_Lowe_0002",
]


@pytest.fixture(scope="module")
def lfw(faces_dir, tmp_path_factory):
    """The fixture's LFW photos in the release layout ROOT/<Name>/<Name>_<NNNN>.jpg, and the landmarks."""
    root = tmp_path_factory.mktemp("lfw")
    for stem in LFW_NAMES:
        person = stem.rsplit("_", 1)[0]
        (root / person).mkdir(exist_ok=True)
        shutil.copy(faces_dir / "images" / "lfw" / f"{stem}.jpg", root / person / f"{stem}.jpg")
    marks = faces_dir / "lfw" / "lfw_landmark.txt"
    points = {k: v for k, v in load_landmarks(marks).items() if k.rsplit("/", 1)[-1][:-4] in LFW_NAMES}
    return root, faces_dir / "lfw" / "pairs.txt", marks, points


def _decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def test_lfw_real_pairs_file_keeps_present_pairs_in_their_fold(lfw, tmp_path):
    root, pairs, marks, points = lfw
    entry = read_lfw(root, pairs, tmp_path / "out", marks)
    # of View 2's 6000 pairs only "Anthony_Hopkins 1 2" (line 5418: fold 9 of 10) has both photos here
    assert entry["listed"] == 6000 and entry["pairs"] == 1 and entry["left_out"] == 5999
    table = pq.read_table(tmp_path / "out" / "pairs" / "pairs.parquet")
    assert table.column("issame").to_pylist() == [True] and table.column("fold").to_pylist() == [9]
    crop = _decode(table.column("image_a")[0].as_py())
    assert crop.shape == (112, 112, 3)
    # the crop is the align stage's warp of the photo at the file's landmarks
    photo = cv2.imread(str(root / "Anthony_Hopkins" / "Anthony_Hopkins_0001.jpg"))
    expected, _, _ = align_face(photo, points["Anthony_Hopkins/Anthony_Hopkins_0001.jpg"])
    assert np.abs(crop.astype(float) - expected).mean() < 3.0  # JPEG re-encoding only
    assert json.loads((tmp_path / "out" / "protocol.json").read_text())["kind"] == "pairs"


def test_lfw_own_pairs_file_header_and_both_line_shapes(lfw, tmp_path):
    root, _, marks, _ = lfw
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(
        "2\t1\n"
        "Anthony_Hopkins\t1\t2\n"
        "Anthony_Hopkins\t1\tRob_Lowe\t1\n"
        "Rob_Lowe\t1\t2\n"
        "Nathalie_Baye\t2\tRob_Lowe\t2\n"
    )
    entry = read_lfw(root, pairs, tmp_path / "out", marks, template="sphereface", name="mini")
    table = pq.read_table(tmp_path / "out" / "pairs" / "mini.parquet")
    assert entry["pairs"] == 4 and entry["left_out"] == 0
    assert table.column("issame").to_pylist() == [True, False, True, False]
    assert table.column("fold").to_pylist() == [0, 0, 1, 1]  # the header's 2 folds of 1 + 1 pairs
    assert _decode(table.column("image_b")[3].as_py()).shape == (112, 96, 3)  # the SphereFace template


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("1\t1\nAnthony_Hopkins\t1\t2\nAnthony_Hopkins\tx\tRob_Lowe\n", "record 3"),
        ("3\t1\nAnthony_Hopkins\t1\t2\nAnthony_Hopkins\t1\tRob_Lowe\t1\n", "line 1"),
    ],
)
def test_lfw_bad_pairs_line_names_file_and_line(lfw, tmp_path, text, where):
    root, _, marks, _ = lfw
    pairs = tmp_path / "bad_pairs.txt"
    pairs.write_text(text)
    with pytest.raises(DataError, match=where) as err:
        read_lfw(root, pairs, tmp_path / "out", marks)
    assert str(pairs) in str(err.value)


def _ijb_release(root, lfw_root, points):
    """An IJB-C release in miniature: LFW photos as loose crops, the five meta files in their formats."""
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    face, pts = [], []
    # (image, template, media): templates 1-2 Hopkins (1 has two frames of one media), 3 Rob Lowe, 4 Baye
    rows = [
        (LFW_NAMES[0], 1, 10),
        (LFW_NAMES[1], 1, 10),
        (LFW_NAMES[1], 2, 11),
        (LFW_NAMES[3], 3, 12),
        (LFW_NAMES[4], 3, 13),
        (LFW_NAMES[2], 4, 14),
    ]
    for i, (stem, tid, mid) in enumerate(rows, start=1):
        person = stem.rsplit("_", 1)[0]
        shutil.copy(lfw_root / person / f"{stem}.jpg", root / "loose_crop" / f"{i}.jpg")
        face.append(f"{i}.jpg {tid} {mid}")
        xy = " ".join(f"{v:.3f}" for v in points[f"{person}/{stem}.jpg"].ravel())
        pts.append(f"{i}.jpg {xy} {0.9 + 0.01 * i:.4f}")
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(face) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(pts) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("1 2 1\n1 3 0\n2 4 0\n")
    head = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT\n"
    (root / "meta" / "ijbc_1N_gallery_G1.csv").write_text(
        head + "1,101,img/1.jpg,5,0,0,9,9\n1,101,img/2.jpg,5,1,1,9,9\n"
    )
    (root / "meta" / "ijbc_1N_gallery_G2.csv").write_text(head + "3,102,img/4.jpg,6,0,0,9,9\n")
    (root / "meta" / "ijbc_1N_probe_mixed.csv").write_text(
        head + "2,101,img/3.jpg,7,0,0,9,9\n4,103,img/6.jpg,8,0,0,9,9\n"
    )
    return rows


def test_ijb_release_layout_becomes_template_tables(lfw, tmp_path):
    lfw_root, _, _, marks = lfw
    rows = _ijb_release(tmp_path / "IJBC", lfw_root, marks)
    info = read_ijb(tmp_path / "IJBC", tmp_path / "out")
    assert info["images"] == 6 and info["templates"] == 4 and info["pairs"] == 3
    images = pq.read_table(tmp_path / "out" / "images.parquet")
    assert images.column("template").to_pylist() == [r[1] for r in rows]
    assert images.column("media").to_pylist() == [r[2] for r in rows]
    np.testing.assert_allclose(images.column("faceness").to_numpy(), 0.9 + 0.01 * np.arange(1, 7), atol=1e-6)
    assert _decode(images.column("image")[0].as_py()).shape == (112, 112, 3)
    gallery = pq.read_table(tmp_path / "out" / "gallery.parquet").to_pydict()
    assert gallery == {
        "template": [1, 3],
        "subject": [101, 102],
        "gallery": ["G1", "G2"],
    }  # one row a template
    assert pq.read_table(tmp_path / "out" / "probe.parquet").to_pydict() == {
        "template": [2, 4],
        "subject": [101, 103],
    }
    pairs = pq.read_table(tmp_path / "out" / "template_pairs.parquet").to_pydict()
    assert pairs == {"t1": [1, 1, 2], "t2": [2, 3, 4], "label": [1, 0, 0]}


@pytest.mark.parametrize(
    ("file", "bad", "where"),
    [
        ("ijbc_name_5pts_score.txt", "3.jpg 1 2 3\n", "line 3"),
        ("ijbc_face_tid_mid.txt", "3.jpg two 11\n", "line 3"),
        ("ijbc_template_pair_label.txt", "1 2 7\n", "line 3"),
        ("ijbc_1N_probe_mixed.csv", "x,101,img/3.jpg\n", "line 3"),
    ],
)
def test_ijb_bad_line_names_file_and_line(lfw, tmp_path, file, bad, where):
    lfw_root, _, _, marks = lfw
    _ijb_release(tmp_path / "IJBC", lfw_root, marks)
    path = tmp_path / "IJBC" / "meta" / file
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = bad
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=where) as err:
        read_ijb(tmp_path / "IJBC", tmp_path / "out")
    assert str(path) in str(err.value)


def test_ijb_reordered_landmark_file_is_refused(lfw, tmp_path):
    lfw_root, _, _, marks = lfw
    _ijb_release(tmp_path / "IJBC", lfw_root, marks)
    path = tmp_path / "IJBC" / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([lines[1], lines[0], *lines[2:]]))
    with pytest.raises(DataError, match="row 1 names 2.jpg"):
        read_ijb(tmp_path / "IJBC", tmp_path / "out")


def _ytf_release(root, lfw_root, points):
    """YTF layout: frames/<Name>/<video>/<video>.<n>.jpg (LFW photos as frames), splits.txt, 5 points."""
    videos = {
        "Anthony_Hopkins/0": LFW_NAMES[:2],
        "Anthony_Hopkins/1": LFW_NAMES[1:2],
        "Rob_Lowe/0": LFW_NAMES[3:5],
    }
    lines = []
    for video, stems in videos.items():
        (root / "frames" / video).mkdir(parents=True)
        for n, stem in enumerate(stems):
            person = stem.rsplit("_", 1)[0]
            rel = f"{video}/{video[-1]}.{n}.jpg"
            shutil.copy(lfw_root / person / f"{stem}.jpg", root / "frames" / rel)
            lines.append(rel + "\t" + "\t".join(str(v) for v in points[f"{person}/{stem}.jpg"].ravel()))
    (root / "landmarks.txt").write_text("\n".join(lines) + "\n")
    (root / "splits.txt").write_text(
        "split number, first name, second name, match, is same\n"
        "1, Anthony_Hopkins/0, Anthony_Hopkins/1, 1, 1\n"
        "2, Anthony_Hopkins/1, Rob_Lowe/0, 0, 0\n"
        "2, Rob_Lowe/0, Nobody/3, 0, 0\n"
    )


def test_ytf_frames_and_splits_become_video_tables(lfw, tmp_path):
    lfw_root, _, _, marks = lfw
    _ytf_release(tmp_path / "YTF", lfw_root, marks)
    info = read_ytf(
        tmp_path / "YTF" / "frames",
        tmp_path / "YTF" / "splits.txt",
        tmp_path / "out",
        tmp_path / "YTF" / "landmarks.txt",
    )
    assert info["frames"] == 5 and info["pairs"] == 2 and info["left_out"] == 1  # Nobody/3 has no frames
    frames = pq.read_table(tmp_path / "out" / "frames.parquet").to_pydict()
    assert frames["frame"][:2] == ["Anthony_Hopkins/0/0.0.jpg", "Anthony_Hopkins/0/0.1.jpg"]
    assert frames["video"] == [0, 0, 1, 2, 2]
    pairs = pq.read_table(tmp_path / "out" / "video_pairs.parquet").to_pydict()
    assert pairs == {"video_a": [0, 1], "video_b": [1, 2], "issame": [True, False], "fold": [0, 1]}


def test_ytf_bad_split_line_and_missing_landmarks(lfw, tmp_path):
    lfw_root, _, _, marks = lfw
    _ytf_release(tmp_path / "YTF", lfw_root, marks)
    splits = tmp_path / "YTF" / "splits.txt"
    splits.write_text(
        splits.read_text().replace("2, Anthony_Hopkins/1, Rob_Lowe/0, 0, 0", "2, Anthony_Hopkins/1")
    )
    with pytest.raises(DataError, match="line 3") as err:
        read_ytf(tmp_path / "YTF" / "frames", splits, tmp_path / "out", tmp_path / "YTF" / "landmarks.txt")
    assert str(splits) in str(err.value)
    splits.write_text("1, Anthony_Hopkins/0, Anthony_Hopkins/1, 1, 1\n")
    with pytest.raises(DataError, match="no landmarks"):
        read_ytf(tmp_path / "YTF" / "frames", splits, tmp_path / "out")
