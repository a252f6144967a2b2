"""YuNet detection: shrinking large images, the close-up retry, choosing the main face."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from facepipe.data.align.detect import DetectedFace, FaceDetector, box_iou, pick_main_face
from facepipe.errors import FacepipeError

MODEL = "models/face_detection_yunet_2023mar.onnx"


def _face(x, y, w, h, score=0.9):
    return DetectedFace(box=(x, y, w, h), landmarks=np.zeros((5, 2), np.float32), score=score)


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == pytest.approx(1.0)
    assert box_iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0


def test_main_face_is_large_and_central():
    shape = (1000, 1000, 3)
    centre_small = _face(450, 450, 100, 100)
    corner_same = _face(0, 0, 100, 100)
    corner_huge = _face(0, 0, 400, 400)
    assert pick_main_face([corner_same, centre_small], shape) is centre_small
    assert pick_main_face([centre_small, corner_huge], shape) is corner_huge
    assert pick_main_face([], shape) is None


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FacepipeError, match="detector model not found"):
        FaceDetector(tmp_path / "absent.onnx")


@pytest.fixture(scope="module")
def detector(faces_dir):
    return FaceDetector(faces_dir / MODEL, score_threshold=0.6)


@pytest.fixture(scope="module")
def obama(faces_dir):
    manifest = json.loads((faces_dir / "manifest.json").read_text())
    entry = next(e for e in manifest["images"] if e["file"].endswith("barack_obama__obama_obama.jpg"))
    return cv2.imread(str(faces_dir / entry["file"])), entry["detections"][0]


def test_blank_image_has_no_face(detector):
    assert detector.detect(np.full((300, 400, 3), 128, np.uint8)) == []


def test_reproduces_the_manifest_detection(detector, obama):
    image, expected = obama
    faces = detector.detect(image)
    assert len(faces) == 1
    assert box_iou(faces[0].box, tuple(expected["box_xywh"])) > 0.98
    np.testing.assert_allclose(faces[0].landmarks, expected["landmarks5"], atol=0.5)
    assert faces[0].score == pytest.approx(expected["score"], abs=1e-3)


def test_large_image_is_shrunk_and_coordinates_mapped_back(detector, obama):
    # 3.5x: the face is ~1050 px tall, which YuNet misses at full resolution.
    image, expected = obama
    big = cv2.resize(image, None, fx=3.5, fy=3.5, interpolation=cv2.INTER_CUBIC)
    faces = detector.detect(big)
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].landmarks / 3.5, expected["landmarks5"], atol=2.0)
    assert box_iou(tuple(v / 3.5 for v in faces[0].box), tuple(expected["box_xywh"])) > 0.9


def test_close_up_is_found_by_the_retry(detector, obama):
    # A face filling a 1000 px frame: at that scale YuNet returns weak, wrong boxes; the retry finds it.
    image, expected = obama
    x, y, w, h = expected["box_xywh"]
    crop = image[int(y - 0.05 * h) : int(y + 1.02 * h), int(x - 0.1 * w) : int(x + 1.1 * w)]
    scale = 1000 / crop.shape[0]
    close = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    truth = (np.array(expected["landmarks5"]) - [int(x - 0.1 * w), int(y - 0.05 * h)]) * scale
    no_retry = FaceDetector(detector.model_path, score_threshold=0.6, retry_side=10_000)
    assert all(f.score < 0.85 for f in no_retry.detect(close))
    face = pick_main_face(detector.detect(close), close.shape)
    assert face is not None and face.score > 0.85
    assert np.linalg.norm(face.landmarks - truth, axis=1).mean() < 0.05 * close.shape[0]
