"""Alignment core and the align job on generated images with known landmarks (no detector needed)."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facepipe.data.align import run as align_run
from facepipe.data.align import worker as align_worker
from facepipe.data.align.job import (
    TEMPLATES,
    AlignSettings,
    align_face,
    apply_transform,
    decode_image,
    encode_image,
    get_template,
    landmark_error,
    run_align,
    similarity_transform,
)
from facepipe.data.formats.landmarks import load_landmarks, normalise_key, parse_landmark_line
from facepipe.data.shards import TRAIN_SCHEMA, decode_images
from facepipe.errors import DataError, FacepipeError
from facepipe.fsutil import unescape_name

ARCFACE = np.array(TEMPLATES["arcface"].points)


def _similarity(angle: float, scale: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


# ------------------------------------------------------------------------------------------- transform


@settings(max_examples=60, deadline=None)
@given(
    angle=st.floats(-math.pi, math.pi),
    scale=st.floats(0.05, 20.0),
    tx=st.floats(-500, 500),
    ty=st.floats(-500, 500),
)
def test_exact_similarity_is_recovered(angle, scale, tx, ty):
    truth = _similarity(angle, scale, tx, ty)
    src = ARCFACE * 3.0 + 17.0
    dst = apply_transform(truth, src)
    fitted = similarity_transform(src, dst)
    np.testing.assert_allclose(apply_transform(fitted, src), dst, atol=1e-6 * max(1.0, scale * 400))
    np.testing.assert_allclose(fitted, truth, rtol=1e-6, atol=1e-6 * max(1.0, abs(tx) + abs(ty)))


def test_fit_is_the_least_squares_optimum():
    # Solve the same problem as a generic linear least-squares in (a, b, tx, ty) and compare.
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 250, (5, 2))
    dst = ARCFACE + rng.normal(0, 3, (5, 2))
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    np.testing.assert_allclose(similarity_transform(src, dst), [[a, -b, tx], [b, a, ty]], atol=1e-9)


def test_a_mirror_image_is_not_fitted_with_a_reflection():
    mirrored = ARCFACE * np.array([-1.0, 1.0])
    matrix = similarity_transform(mirrored, ARCFACE)
    assert np.linalg.det(matrix[:, :2]) > 0  # rotation + scale only


@pytest.mark.parametrize(
    "points", [np.zeros((5, 2)), np.full((5, 2), np.nan), np.ones((1, 2))], ids=["same", "nan", "one"]
)
def test_degenerate_landmarks_raise(points):
    with pytest.raises(ValueError):
        similarity_transform(points, ARCFACE[: len(points)])


def test_templates():
    arc, sphere, prob = (get_template(n) for n in ("arcface", "sphereface", "probface"))
    assert arc.size == (112, 112) and sphere.size == (112, 96) and prob.size == (96, 96)
    np.testing.assert_allclose(arc.array[0], [38.2946, 51.6963])
    np.testing.assert_allclose(sphere.array, arc.array - [8.0, 0.0])
    np.testing.assert_allclose(prob.array, arc.array * 96 / 112)
    for t in (arc, sphere, prob):  # eyes level and the face centred horizontally
        assert abs(t.array[0, 1] - t.array[1, 1]) < 0.5
        assert abs(t.array[2, 0] - t.size[1] / 2) < 1.0
    with pytest.raises(FacepipeError, match="unknown template"):
        get_template("vggface")


def _dot_image(points: np.ndarray, size=(240, 260), radius: int = 3) -> np.ndarray:
    """A noisy image with five distinct coloured dots at `points`."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(points):
        colour = [0, 0, 0]
        colour[i % 3] = 255
        if i >= 3:
            colour[(i + 1) % 3] = 255
        cv2.circle(image, (round(x * 16), round(y * 16)), radius * 16, colour, -1, cv2.LINE_AA, shift=4)
    return image


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_warp_puts_the_image_points_on_the_template(name):
    template = get_template(name)
    source_points = apply_transform(_similarity(0.4, 1.7, 40, 10), ARCFACE)
    crop, matrix, warped = align_face(_dot_image(source_points), source_points, template)
    assert crop.shape == (*template.size, 3)
    assert landmark_error(warped, template).max() < 1e-6
    # The dots really moved: each dot's colour (median position) in the crop lies on its template point.
    for i, (x, y) in enumerate(template.array):
        colour = np.zeros(3, bool)
        colour[i % 3] = True
        if i >= 3:
            colour[(i + 1) % 3] = True
        mask = np.all((crop > 160) == colour, axis=2)
        ys, xs = np.nonzero(mask)
        assert len(xs) > 3
        # median: blended edge pixels of a neighbouring dot can match a colour too
        assert math.hypot(np.median(xs) - x, np.median(ys) - y) < 1.0


def test_decode_and_encode():
    assert decode_image(b"") is None
    assert decode_image(b"not an image at all") is None
    image = np.random.default_rng(0).integers(0, 255, (112, 96, 3), dtype=np.uint8)
    for fmt in ("jpg", "png"):
        back = decode_image(encode_image(image, fmt))
        assert back.shape == image.shape
    assert np.array_equal(decode_image(encode_image(image, "png")), image)
    gray = cv2.imencode(".png", image[..., 0])[1].tobytes()
    assert decode_image(gray).shape == (112, 96, 3)


# ------------------------------------------------------------------------------------------- landmarks


def test_landmark_lines(tmp_path):
    key, points = parse_landmark_line(
        "Aaron_Eckhart/Aaron_Eckhart_0001.jpg\t107\t107\t147\t111\t124\t143\t103\t157\t139\t161"
    )
    assert key == "Aaron_Eckhart/Aaron_Eckhart_0001.jpg"
    np.testing.assert_array_equal(points[0], [107, 107])
    np.testing.assert_array_equal(points[4], [139, 161])
    key, points = parse_landmark_line("./0000045/001.jpg 0 1 2 3 4 5 6 7 8 9 10")  # CASIA: label column
    assert key == "0000045/001.jpg" and points[0].tolist() == [1, 2]
    assert parse_landmark_line("   # a comment") is None
    assert normalise_key("a\\b.jpg") == "a/b.jpg"
    bad = tmp_path / "marks.txt"
    bad.write_text("a/1.jpg 1 2 3 4 5 6 7 8 9 10\n\na/2.jpg 1 2 3\n")
    with pytest.raises(DataError, match=r"marks\.txt.*line 3"):
        load_landmarks(bad)
    bad.write_text("a/1.jpg 1 2 3 4 5 6 7 8 9 10\na/1.jpg 1 2 3 4 5 6 7 8 9 10\n")
    with pytest.raises(DataError, match="listed twice"):
        load_landmarks(bad)
    bad.write_text("a/1.jpg 1 2 3 4 x 6 7 8 9 10\n")
    with pytest.raises(DataError, match="line 1"):
        load_landmarks(bad)


# ------------------------------------------------------------------------------------------- the job


def _make_folder(root, identities=("bob", "alice", "carol"), per_identity=4, extra=True):
    """Identity folders of generated images, a landmark file for them, plus awkward files."""
    src = root / "src"
    lines = []
    rng = np.random.default_rng(7)
    for identity in identities:
        for i in range(per_identity):
            points = apply_transform(
                _similarity(rng.uniform(-0.5, 0.5), rng.uniform(1.2, 2.0), 30, 20), ARCFACE
            )
            path = src / identity / f"{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_image(_dot_image(points)))
            lines.append(f"{identity}/{i:03d}.jpg " + " ".join(f"{v:.2f}" for v in points.ravel()))
    if extra:
        (src / "bob" / "notes.txt").write_text("not an image")
        (src / "alice" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
        lines.append("alice/broken.jpg " + " ".join(["50"] * 10))
        (src / "alice" / "sub").mkdir()
        (src / "alice" / "sub" / "x.png").write_bytes(encode_image(_dot_image(ARCFACE * 2), "png"))
        lines.append("alice/sub/x.png " + " ".join(f"{v}" for v in (ARCFACE * 2).ravel()))
        (src / "loose.jpg").write_bytes(b"at the root")
        (src / "empty_identity").mkdir()
    marks = root / "landmarks.txt"
    marks.write_text("\n".join(lines) + "\n")
    return src, marks


def _read(out):
    return pq.read_table(out / "train").sort_by("key")


def test_folder_job_writes_training_shards_and_rejects(tmp_path):
    src, marks = _make_folder(tmp_path)
    out = tmp_path / "out"
    result = run_align(src, out, AlignSettings(), landmarks_file=marks, chunk_size=5)
    assert result["inputs"] == 3 * 4 + 4
    table = _read(out)
    assert table.schema.equals(TRAIN_SCHEMA)
    assert table.num_rows == 13 and result["aligned"] == 13 and result["detected"] == 0
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert {r["source_path"]: r["reason"] for r in rejects} == {
        "alice/broken.jpg": "decode_failed",
        "bob/notes.txt": "not_an_image",
        "loose.jpg": "no_identity_folder",
    }
    # Every input is accounted for exactly once, with unique keys.
    keys = table["key"].to_pylist() + [r["key"] for r in rejects]
    assert sorted(keys) == list(range(16))
    labels = json.loads((out / "labels.json").read_text())
    assert labels == {"alice": 0, "bob": 1, "carol": 2}  # sorted names; the empty folder has no label
    by_path = dict(zip(table["source_path"].to_pylist(), table["label"].to_pylist(), strict=True))
    assert by_path["alice/sub/x.png"] == 0 and by_path["carol/003.jpg"] == 2
    images = decode_images(table["image"], size=None)
    assert images.shape == (13, 112, 112, 3)
    for row in table.select(["landmarks"]).to_pylist():
        assert landmark_error(np.array(row["landmarks"]).reshape(5, 2)).max() < 0.01
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_images"] == 13 and manifest["num_classes"] == 3
    assert manifest["image_size"] == [112, 112] and manifest["color_order"] == "RGB"
    assert sum(s["rows"] for s in manifest["shards"]) == 13
    assert (out / "contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "_work").exists()


@pytest.mark.parametrize("name", ["sphereface", "probface"])
def test_other_templates_give_their_size(tmp_path, name):
    src, marks = _make_folder(tmp_path, identities=("a",), per_identity=2, extra=False)
    run_align(src, tmp_path / "out", AlignSettings(template=name), landmarks_file=marks, contact_sheet=False)
    table = _read(tmp_path / "out")
    assert decode_images(table["image"]).shape[1:3] == get_template(name).size
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["image_size"] == list(get_template(name).size)


def test_missing_landmarks_without_a_detector_is_a_clear_error(tmp_path):
    src, marks = _make_folder(tmp_path, extra=False)
    (src / "bob" / "new.jpg").write_bytes((src / "bob" / "000.jpg").read_bytes())
    with pytest.raises(FacepipeError, match=r"1 image.*bob/new\.jpg.*--detector-model"):
        run_align(src, tmp_path / "out", AlignSettings(), landmarks_file=marks)
    with pytest.raises(FacepipeError, match="detector model not found"):
        run_align(src, tmp_path / "out2", AlignSettings(detector_model=str(tmp_path / "nope.onnx")))


def test_interrupted_job_resumes_to_the_same_result(tmp_path, monkeypatch):
    src, marks = _make_folder(tmp_path)
    reference = tmp_path / "reference"
    run_align(src, reference, AlignSettings(), landmarks_file=marks, chunk_size=3, contact_sheet=False)

    real = align_run.align_chunk  # run_tasks looks the worker up in align_run
    calls = []

    def crash_on_third(task):
        calls.append(task.index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is stopped mid-job
        return real(task)

    out = tmp_path / "out"
    monkeypatch.setattr(align_run, "align_chunk", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_align(src, out, AlignSettings(), landmarks_file=marks, chunk_size=3, contact_sheet=False)
    assert not (out / "manifest.json").exists()
    (out / "_work" / ".chunk-000009.parquet.tmp").write_bytes(b"half written")  # debris of a killed writer
    calls.clear()
    monkeypatch.setattr(align_run, "align_chunk", lambda task: calls.append(task.index) or real(task))
    run_align(src, out, AlignSettings(), landmarks_file=marks, chunk_size=3, contact_sheet=False)
    assert 0 not in calls and 1 not in calls and 2 in calls  # finished chunks were not redone
    assert _read(out).equals(_read(reference))
    assert pq.read_table(out / "rejects.parquet").equals(pq.read_table(reference / "rejects.parquet"))

    again = run_align(src, out, AlignSettings(), landmarks_file=marks, chunk_size=3, contact_sheet=False)
    assert again["skipped"] and again["aligned"] == 13
    with pytest.raises(FacepipeError, match="another OUT"):
        run_align(src, out, AlignSettings(template="probface"), landmarks_file=marks, chunk_size=3)


def test_shard_input_in_parallel_processes(tmp_path):
    """Shards of unaligned images (key, label, image, landmarks) align like a folder, across 2 processes."""
    rng = np.random.default_rng(3)
    rows = {"key": [], "label": [], "image": [], "landmarks": []}
    for key in range(10):
        points = apply_transform(_similarity(rng.uniform(-0.3, 0.3), 1.5, 30, 25), ARCFACE)
        rows["key"].append(100 + key)
        rows["label"].append(key % 4)
        rows["image"].append(encode_image(_dot_image(points)) if key != 4 else b"junk")
        rows["landmarks"].append(points.ravel().astype(np.float32).tolist())
    src = tmp_path / "shards"
    src.mkdir()
    table = pa.table(rows)
    pq.write_table(table.slice(0, 6), src / "a.parquet", row_group_size=2)
    pq.write_table(table.slice(6), src / "b.parquet", row_group_size=2)
    out = tmp_path / "out"
    result = run_align(src, out, AlignSettings(), workers=2, chunk_size=2, contact_sheet=False)
    assert result["aligned"] == 9 and result["rejected"] == 1
    aligned = _read(out)
    assert aligned["key"].to_pylist() == [100, 101, 102, 103, 105, 106, 107, 108, 109]
    assert aligned["label"].to_pylist() == [0, 1, 2, 3, 1, 2, 3, 0, 1]
    assert aligned["source_path"][0].as_py() == "a.parquet#key=100"
    reject = pq.read_table(out / "rejects.parquet").to_pylist()[0]
    assert reject["key"] == 104 and reject["reason"] == "decode_failed" and reject["source"] == "a.parquet"
    assert json.loads((out / "manifest.json").read_text())["num_classes"] == 4


def test_odd_file_names_and_out_inside_src(tmp_path):
    import os

    src, marks = _make_folder(tmp_path, identities=("a",), per_identity=1, extra=False)
    with open(os.path.join(os.fsencode(src / "a"), b"caf\xe9.txt"), "wb") as handle:  # a Latin-1 name
        handle.write(b"notes")
    with pytest.raises(FacepipeError, match="must not lie inside SRC"):
        run_align(src, src / "aligned", AlignSettings(), landmarks_file=marks)
    result = run_align(src, tmp_path / "out", AlignSettings(), landmarks_file=marks)
    assert result["aligned"] == 1 and result["rejected"] == 1
    reject = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()[0]
    # the Latin-1 byte is kept losslessly (issue 18: `\xe9` escaped, not replaced by U+FFFD)
    assert reject["source_path"] == "a/caf\\xe9.txt" and reject["reason"] == "not_an_image"
    assert unescape_name(reject["source_path"]) == b"a/caf\xe9.txt"


@pytest.mark.slow  # three CLI processes: ~10-20 s on a busy 2-core machine
def test_killed_process_resumes_without_duplicates_or_gaps(tmp_path):
    """SIGKILL a real `facepipe align` process mid-job, run it again, compare with an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    lines = []
    for i in range(24):
        points = apply_transform(_similarity(rng.uniform(-0.3, 0.3), 8.0, 200, 150), ARCFACE)
        image = rng.integers(0, 255, (1200, 1200, 3), dtype=np.uint8)  # slow to decode: the kill lands midway
        path = src / f"id{i % 3}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(image))
        lines.append(f"id{i % 3}/{i:03d}.jpg " + " ".join(f"{v:.2f}" for v in points.ravel()))
    marks = tmp_path / "marks.txt"
    marks.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "facepipe", "align", str(src), None, "--landmarks", str(marks)]
    cmd += ["--chunk-size", "1", "--workers", "1", "--no-contact-sheet"]

    out = tmp_path / "out"
    job = subprocess.Popen([str(out) if c is None else c for c in cmd], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "_work").glob("*.done.json"))) < 3 and time.monotonic() < deadline:
        if job.poll() is not None:
            break
        time.sleep(0.01)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    if (out / "manifest.json").exists():
        pytest.skip("the job finished before it could be killed (machine much faster than expected)")
    done_before = len(list((out / "_work").glob("*.done.json")))
    assert 3 <= done_before < 24

    resumed = subprocess.run([str(out) if c is None else c for c in cmd], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done_before} of 24 chunks already done" in resumed.stderr
    reference = tmp_path / "reference"
    subprocess.run([str(reference) if c is None else c for c in cmd], check=True, capture_output=True)
    assert _read(out).equals(_read(reference))
    assert _read(out)["key"].to_pylist() == list(range(24))


def test_shard_input_with_a_landmark_file_keyed_by_key(tmp_path):
    points = apply_transform(_similarity(0.2, 1.5, 30, 25), ARCFACE)
    src = tmp_path / "shards"
    src.mkdir()
    pq.write_table(
        pa.table({"key": [7, 8], "label": [0, 1], "image": [encode_image(_dot_image(points))] * 2}),
        src / "part-00000.parquet",
    )
    marks = tmp_path / "marks.txt"
    marks.write_text("".join(f"{k} " + " ".join(f"{v:.3f}" for v in points.ravel()) + "\n" for k in (7, 8)))
    result = run_align(src, tmp_path / "out", AlignSettings(), landmarks_file=marks, contact_sheet=False)
    assert result["aligned"] == 2 and result["detected"] == 0


def test_a_decoded_dataset_folder_is_read_as_shards(tmp_path):
    # The decode stage's layout: train/part-*.parquet, pairs/, manifest.json with the class count.
    points = apply_transform(_similarity(0.1, 1.5, 30, 25), ARCFACE)
    src = tmp_path / "decoded"
    (src / "train").mkdir(parents=True)
    (src / "pairs").mkdir()
    (src / "manifest.json").write_text(json.dumps({"num_classes": 5}))
    rows = {"key": [1, 2], "label": [0, 3], "image": [encode_image(_dot_image(points))] * 2}
    rows["landmarks"] = [points.ravel().tolist()] * 2
    pq.write_table(pa.table(rows), src / "train" / "part-00000.parquet")
    result = run_align(src, tmp_path / "out", AlignSettings(), contact_sheet=False)
    assert result["aligned"] == 2 and result["classes"] == 5


def test_pairs_files_both_formats(tmp_path):
    from facepipe.data.align.job import read_pairs_file

    lfw = tmp_path / "pairs.txt"
    lfw.write_text("10\t300\nAbel_Pacheco\t1\t4\nAbel_Pacheco\t1\tAkhmed_Zakayev\t3\n")
    assert read_pairs_file(lfw) == [
        ("Abel_Pacheco/Abel_Pacheco_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0004.jpg", True),
        ("Abel_Pacheco/Abel_Pacheco_0001.jpg", "Akhmed_Zakayev/Akhmed_Zakayev_0003.jpg", False),
    ]
    plain = tmp_path / "plain.txt"
    plain.write_text("# a b same\na/1.jpg\tb/2.jpg\t0\n")
    assert read_pairs_file(plain) == [("a/1.jpg", "b/2.jpg", False)]
    plain.write_text("a/1.jpg b/2.jpg maybe\n")
    with pytest.raises(DataError, match="record 1"):
        read_pairs_file(plain)


def test_folder_job_writes_pair_tables_of_aligned_crops(tmp_path):
    from facepipe.data.shards import read_pair_table

    src, marks = _make_folder(tmp_path)
    pairs = tmp_path / "val.txt"
    pairs.write_text(
        "bob/000.jpg bob/001.jpg 1\nbob/000.jpg carol/002.jpg 0\nalice/broken.jpg alice/000.jpg 1\n"
    )
    out = tmp_path / "out"
    run_align(src, out, AlignSettings(), landmarks_file=marks, pairs_files=[pairs], contact_sheet=False)
    table = read_pair_table(out / "pairs" / "val.parquet")
    assert table["issame"].to_pylist() == [True, False]
    assert decode_images(table["image_a"]).shape == (2, 112, 112, 3)
    crops = dict(zip(_read(out)["source_path"].to_pylist(), _read(out)["image"].to_pylist(), strict=True))
    assert table["image_b"][1].as_py() == crops["carol/002.jpg"]
    entry = json.loads((out / "manifest.json").read_text())["pairs"][0]
    assert entry["path"] == "pairs/val.parquet" and entry["pairs"] == 2 and entry["left_out"] == 1


def test_jpeg_size_reads_the_frame_header():
    from facepipe.data.align.job import jpeg_size

    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    for params in ([], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]):
        assert jpeg_size(cv2.imencode(".jpg", image, params)[1].tobytes()) == (53, 37)
    assert jpeg_size(encode_image(image, "png")) is None
    assert jpeg_size(b"\xff\xd8\xff") is None and jpeg_size(b"") is None


def test_large_jpeg_is_reduced_while_decoding_and_file_landmarks_follow(tmp_path):
    # 2600x2400 px with the dots 10x larger: decoded at half size, the file's full-size points are mapped.
    from facepipe.data.align.job import decode_for_alignment

    points = apply_transform(_similarity(0.3, 10.0, 600, 300), ARCFACE)
    big = _dot_image(points, size=(2600, 2400), radius=30)
    data = encode_image(big)
    image, scale = decode_for_alignment(data, keep_side=1024)
    assert image.shape[:2] == (1300, 1200) and scale == 0.5
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    (src / "big.jpg").write_bytes(data)
    marks = tmp_path / "marks.txt"
    marks.write_text("a/big.jpg " + " ".join(f"{v:.3f}" for v in points.ravel()) + "\n")
    run_align(tmp_path / "src", tmp_path / "out", AlignSettings(), landmarks_file=marks, contact_sheet=False)
    crop = decode_image(_read(tmp_path / "out")["image"][0].as_py())
    for i, (x, y) in enumerate(ARCFACE):
        colour = np.zeros(3, bool)
        colour[i % 3] = True
        if i >= 3:
            colour[(i + 1) % 3] = True
        ys, xs = np.nonzero(np.all((crop > 160) == colour, axis=2))
        assert math.hypot(np.median(xs) - x, np.median(ys) - y) < 1.0


@pytest.mark.slow
@pytest.mark.integration  # starts a local Ray
def test_chunks_run_as_ray_tasks_give_the_same_shards(tmp_path):
    src, marks = _make_folder(tmp_path, identities=("a", "b"), per_identity=3, extra=False)
    run_align(
        src, tmp_path / "local", AlignSettings(), landmarks_file=marks, chunk_size=2, contact_sheet=False
    )
    result = run_align(
        src,
        tmp_path / "ray",
        AlignSettings(),
        landmarks_file=marks,
        chunk_size=2,
        contact_sheet=False,
        executor="ray",
        workers=2,
    )
    assert result["aligned"] == 6
    assert _read(tmp_path / "ray").equals(_read(tmp_path / "local"))


def test_an_unexpected_error_on_one_image_is_a_reject_not_a_crash(tmp_path, monkeypatch):
    src, marks = _make_folder(tmp_path, identities=("a",), per_identity=3, extra=False)
    real = align_worker.encode_image
    calls = []

    def flaky(image, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated encoder failure")
        return real(image, *args)

    monkeypatch.setattr(align_worker, "encode_image", flaky)
    result = run_align(src, tmp_path / "out", AlignSettings(), landmarks_file=marks, contact_sheet=False)
    assert result["aligned"] == 2 and result["reasons"] == {"align_failed": 1}
    reject = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()[0]
    assert reject["source_path"] == "a/001.jpg" and "simulated encoder failure" in reject["detail"]


def test_cli_without_a_detector_model_names_the_images_and_the_flag(tmp_path, capsys):
    # params.yaml ships `align.detector_model: null`: images without landmarks must give a clear error
    # (exit 2, no traceback) before any work, naming an image and how to configure the detector.
    from pathlib import Path

    from facepipe.cli import main

    params = Path(__file__).resolve().parents[2] / "params.yaml"
    src, marks = _make_folder(tmp_path, identities=("a", "b"), per_identity=2, extra=False)
    (src / "b" / "unmarked.jpg").write_bytes((src / "b" / "000.jpg").read_bytes())
    out = tmp_path / "out"
    argv = ["align", str(src), str(out), "--params", str(params), "--landmarks", str(marks)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "facepipe align: error: 1 image(s) have no landmarks (e.g. b/unmarked.jpg)" in err
    assert "--detector-model PATH" in err and "align.detector_model" in err
    assert "Traceback" not in err and not out.exists()
    assert main([*argv, "--quality", "0"]) == 2
    assert "--quality must be between 1 and 100, not 0" in capsys.readouterr().err
    (src / "b" / "unmarked.jpg").unlink()
    assert main(argv) == 0  # every image has landmarks: no detector needed
    assert "facepipe align: done" in capsys.readouterr().out


def test_the_chunk_worker_is_a_picklable_top_level_task(tmp_path):
    # What a process pool or Ray ships to a worker: the function by reference and a plain task.
    import pickle

    from facepipe.data.align import job as align
    from facepipe.data.align.plan import make_tasks, plan_job
    from facepipe.data.align.worker import align_chunk, chunk_paths

    assert align.align_chunk is align_chunk and align.run_align is align_run.run_align  # old import path
    src, marks = _make_folder(tmp_path, identities=("a", "b"), per_identity=2, extra=False)
    plan = plan_job(src, AlignSettings(), chunk_size=3, landmarks_file=marks)
    tasks = make_tasks(plan, tmp_path / "work", load_landmarks(marks))
    assert [len(t.landmarks) for t in tasks] == [4, 2]  # each task carries only its identities' entries
    worker, task = pickle.loads(pickle.dumps((align_chunk, tasks[1])))
    assert worker is align_chunk
    stats = worker(task)
    assert stats == {"index": 1, "aligned": 1, "rejected": 0, "reasons": {}, "detected": 0}
    rows, rejects, done = chunk_paths(tmp_path / "work", 1)
    assert json.loads(done.read_text()) == stats
    assert pq.read_table(rows)["key"].to_pylist() == [3] and pq.read_table(rejects).num_rows == 0
