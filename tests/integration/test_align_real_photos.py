"""Alignment on the real fixture photos (FACEPIPE_FACES_DIR; skipped when the folder is absent).

The fixture's manifest lists YuNet's boxes, landmarks and scores for each photo and the identity of the
largest face; these tests check detection, the choice of face, the warp and the job's bookkeeping
against it, and that the aligned shards read like decoded .rec shards.
"""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from facepipe.data.align.detect import FaceDetector, box_iou, pick_main_face
from facepipe.data.align.job import AlignSettings, decode_image, get_template, landmark_error, run_align
from facepipe.data.shards import TRAIN_SCHEMA, decode_images, list_shards

MODEL = "models/face_detection_yunet_2023mar.onnx"


@pytest.fixture(scope="module")
def manifest(faces_dir):
    return json.loads((faces_dir / "manifest.json").read_text())


def _labelled(manifest):
    return [e for e in manifest["images"] if e["identity"]]


def _arrange(faces_dir, entries, root):
    """Copy fixture photos into `root/<identity>/<file>` (the image-folder layout)."""
    for entry in entries:
        target = root / entry["identity"] / entry["file"].rsplit("/", 1)[-1]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(faces_dir / entry["file"], target)
    return root


def _pairs_in_folder_layout(faces_dir, manifest, path, identities=None):
    """The fixture's verification pairs, renamed to the `<identity>/<file>` layout of `_arrange`."""
    identity = {e["file"]: e["identity"] for e in manifest["images"]}
    lines = []
    for line in (faces_dir / "verification_pairs.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        a, b, same = line.split("\t")
        if identities is None or (identity[a] in identities and identity[b] in identities):
            rename = [f"{identity[f]}/{f.rsplit('/', 1)[-1]}" for f in (a, b)]
            lines.append("\t".join([*rename, same]))
    path.write_text("\n".join(lines) + "\n")
    return path, len(lines)


def _no_face_image(faces_dir, manifest):
    """A real photo's lower part, below every face box: suit and background, no face."""
    entry = next(e for e in manifest["images"] if e["file"].endswith("barack_obama__obama_obama.jpg"))
    image = cv2.imread(str(faces_dir / entry["file"]))
    bottom = max(d["box_xywh"][1] + d["box_xywh"][3] for d in entry["detections"])
    return cv2.imencode(".jpg", image[int(bottom) + 20 :])[1].tobytes()


@pytest.fixture(scope="module")
def aligned(faces_dir, manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    src = _arrange(faces_dir, _labelled(manifest), root / "src")
    (src / "barack_obama" / "suit_only.jpg").write_bytes(_no_face_image(faces_dir, manifest))
    (src / "barack_obama" / "caption.txt").write_text("not an image")
    (src / "joe_biden" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    out = root / "out"
    settings = AlignSettings(detector_model=str(faces_dir / MODEL), min_score=0.6)
    pairs, n_pairs = _pairs_in_folder_layout(faces_dir, manifest, root / "fixture_pairs.txt")
    result = run_align(src, out, settings, workers=2, chunk_size=30, pairs_files=[pairs])
    table = pq.read_table(out / "train").sort_by("key")
    rejects = {r["source_path"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    return {"src": src, "out": out, "result": result, "table": table, "rejects": rejects, "pairs": n_pairs}


def test_every_labelled_photo_is_aligned_and_the_bad_files_are_rejected(aligned, manifest):
    labelled = _labelled(manifest)
    assert aligned["table"].num_rows == len(labelled)
    assert {k: v["reason"] for k, v in aligned["rejects"].items()} == {
        "barack_obama/suit_only.jpg": "no_face",
        "barack_obama/caption.txt": "not_an_image",
        "joe_biden/corrupt.jpg": "decode_failed",
    }
    assert aligned["result"]["inputs"] == len(labelled) + 3


def test_verification_pairs_become_a_pair_table_of_aligned_crops(aligned):
    from facepipe.data.shards import read_pair_table

    table = read_pair_table(aligned["out"] / "pairs" / "fixture_pairs.parquet")
    assert table.num_rows == aligned["pairs"] == 330  # every pair's images were aligned
    assert sum(table["issame"].to_pylist()) == 165
    assert decode_images(table["image_a"].slice(0, 8)).shape == (8, 112, 112, 3)


def test_the_labelled_face_is_the_one_chosen(aligned, manifest):
    # The manifest's identity applies to detections[0]; the crop must show that face, so its score matches.
    by_path = {f"{e['identity']}/{e['file'].rsplit('/', 1)[-1]}": e for e in _labelled(manifest)}
    for row in aligned["table"].select(["source_path", "det_score"]).to_pylist():
        expected = by_path[row["source_path"]]["detections"][0]["score"]
        # paul_rudd's large face is re-detected at a smaller scale (see detect.py), with a higher score
        assert row["det_score"] == pytest.approx(expected, abs=2e-3) or row["det_score"] > expected


def test_warped_landmarks_lie_on_the_template(aligned):
    errors = np.array(
        [landmark_error(np.array(v).reshape(5, 2)).mean() for v in aligned["table"]["landmarks"].to_pylist()]
    )
    assert np.median(errors) < 4.0
    assert errors.max() < 8.0  # a profile face fits a frontal template less well, but never wildly


def test_faces_found_again_in_the_crops_sit_on_the_template(aligned, faces_dir):
    # Independent of the stored landmarks: detect on the decoded crops (padded so the face is not cut).
    detector = FaceDetector(faces_dir / MODEL, score_threshold=0.5)
    template = get_template("arcface")
    errors = []
    for data in aligned["table"]["image"].to_pylist():
        crop = decode_image(data)
        assert crop.shape == (112, 112, 3)
        canvas = cv2.copyMakeBorder(crop, 56, 56, 56, 56, cv2.BORDER_CONSTANT, value=(127, 127, 127))
        face = pick_main_face(detector.detect(canvas), canvas.shape)
        assert face is not None
        errors.append(landmark_error(face.landmarks - 56.0, template).mean())
    assert np.median(errors) < 4.0


def test_group_photos_yield_every_face_the_manifest_lists(faces_dir, manifest):
    detector = FaceDetector(faces_dir / MODEL, score_threshold=0.7)  # the manifest's threshold
    groups = [e for e in manifest["images"] if len(e["detections"]) > 1]
    assert len(groups) >= 5
    for entry in groups:
        image = cv2.imread(str(faces_dir / entry["file"]))
        found = [f.box for f in detector.detect(image)]
        for expected in entry["detections"]:
            best = max(box_iou(tuple(expected["box_xywh"]), box) for box in found)
            assert best > 0.5, f"{entry['file']}: no detection matches {expected['box_xywh']}"


def test_lfw_entries_align_from_the_landmark_file_without_detection(faces_dir, manifest, tmp_path):
    # LFW layout <person>/<person>_NNNN.jpg, matched against lfw_landmark.txt. No detector model is
    # configured, so any attempt to detect would fail the run.
    entries = [e for e in manifest["images"] if e["file"].startswith("images/lfw/")]
    src = tmp_path / "lfw"
    for entry in entries:
        name = entry["file"].rsplit("/", 1)[-1]
        target = src / name.rsplit("_", 1)[0] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(faces_dir / entry["file"], target)
    out = tmp_path / "out"
    result = run_align(src, out, AlignSettings(), landmarks_file=faces_dir / "lfw" / "lfw_landmark.txt")
    assert result["aligned"] == len(entries) and result["detected"] == 0 and result["rejected"] == 0
    table = pq.read_table(out / "train")
    assert table["det_score"].null_count == len(entries)
    # Where the file's points and YuNet's agree (Anthony Hopkins, 4-5 px apart in the 250 px image),
    # a detector run on the crop finds the face on the template.
    detector = FaceDetector(faces_dir / MODEL, score_threshold=0.5)
    for row in table.to_pylist():
        crop = cv2.copyMakeBorder(decode_image(row["image"]), 56, 56, 56, 56, cv2.BORDER_CONSTANT)
        face = pick_main_face(detector.detect(crop), crop.shape)
        error = landmark_error(face.landmarks - 56.0).mean()
        assert error < (6.0 if row["source_path"].startswith("Anthony_Hopkins/") else 12.0)
    labels = json.loads((out / "labels.json").read_text())
    assert labels == {"Anthony_Hopkins": 0, "Nathalie_Baye": 1, "Rob_Lowe": 2}


def test_end_to_end_cli_shards_read_like_decoded_shards(faces_dir, manifest, tmp_path, capsys):
    from facepipe.cli import main
    from facepipe.data.loader import ShardLoader

    entries = [
        e for e in _labelled(manifest) if e["identity"] in ("barack_obama", "joe_biden", "kate_siegel")
    ]
    src = _arrange(faces_dir, entries, tmp_path / "photos")
    out = tmp_path / "aligned"
    pairs, n_pairs = _pairs_in_folder_layout(
        faces_dir, manifest, tmp_path / "val.txt", {e["identity"] for e in entries}
    )
    argv = ["align", str(src), str(out), "--detector-model", str(faces_dir / MODEL), "--workers", "1"]
    assert main([*argv, "--pairs", str(pairs)]) == 0
    assert "facepipe align: done" in capsys.readouterr().out
    shards = list_shards(out)
    assert shards and all(pq.read_schema(p).equals(TRAIN_SCHEMA) for p in shards)
    table = pq.read_table(shards[0])
    assert decode_images(table["image"]).shape[1:] == (112, 112, 3)
    manifest_out = json.loads((out / "manifest.json").read_text())
    assert manifest_out["num_images"] == len(entries) and manifest_out["num_classes"] == 3
    assert (out / "contact_sheet.png").is_file()
    # The training loader streams them like decoded .rec shards.
    with ShardLoader(shards, batch_size=4, input_size=tuple(manifest_out["image_size"]), workers=1) as loader:
        batch = next(iter(loader.epoch(0)))
    assert tuple(batch.images.shape) == (4, 112, 112, 3) and str(batch.images.dtype) == "torch.uint8"
    assert set(batch.labels.tolist()) <= {0, 1, 2}
    # The backbone stage finds the shards, the class count and the validation pairs.
    from facepipe.data.shards import pair_tables
    from facepipe.train.stage import resolve_data

    data = resolve_data(out)
    assert data.num_classes == 3 and data.num_images == len(entries) and len(data.shards) == len(shards)
    assert pq.read_metadata(pair_tables(out)["val"]).num_rows == n_pairs > 0


def test_faces_below_min_score_are_rejected_as_low_score(faces_dir, manifest, tmp_path):
    entries = [e for e in _labelled(manifest) if e["identity"] == "joe_biden"]
    src = _arrange(faces_dir, entries, tmp_path / "src")
    settings = AlignSettings(detector_model=str(faces_dir / MODEL), min_score=0.99)
    result = run_align(src, tmp_path / "out", settings, contact_sheet=False)
    assert result["aligned"] == 0 and result["reasons"] == {"low_score": len(entries)}
    for reject in pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist():
        assert reject["detail"].startswith("best score 0.9")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_images"] == 0
