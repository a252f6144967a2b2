"""Face detection with OpenCV's YuNet (`cv2.FaceDetectorYN`).

The ONNX model is configuration (`align.detector_model` / `--detector-model`); nothing is downloaded.
YuNet misses faces taller than about 850 px, so large images are shrunk before detection (longest side
at most `max_side`). When that finds no face scoring at least `confident`, the image is tried once more
at a smaller scale (`retry_side`): close-ups whose face fills the frame are missed, or come back as
weak, wrong boxes, at the first scale. Coordinates are always returned in the pixels of
the image that was passed in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facepipe.errors import FacepipeError


@dataclass(frozen=True)
class DetectedFace:
    """One detection: box `(x, y, w, h)`, five landmarks `(5, 2)` in image order, and YuNet's score."""

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float

    @property
    def area(self) -> float:
        return max(self.box[2], 0.0) * max(self.box[3], 0.0)


class FaceDetector:
    """YuNet wrapper returning every face above `score_threshold`, sorted by box area (largest first)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.3,
        top_k: int = 5000,
        max_side: int = 1024,
        retry_side: int = 480,
        confident: float = 0.85,
    ):
        import cv2

        path = Path(model_path)
        if not path.is_file():
            raise FacepipeError(
                f"detector model not found: {path} (set align.detector_model or --detector-model)"
            )
        self.model_path = path
        self.score_threshold = float(score_threshold)
        self.max_side = int(max_side)
        self.retry_side = int(retry_side)
        self.confident = float(confident)
        try:
            self._net = cv2.FaceDetectorYN.create(
                str(path), "", (320, 320), self.score_threshold, float(nms_threshold), int(top_k)
            )
        except cv2.error as err:
            raise FacepipeError(f"cannot load YuNet detector model {path}: {err}") from err

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """All faces in a BGR uint8 image, largest first; shrinks large images before detecting."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 BGR image, got shape {image.shape}")
        faces = self._detect_at(image, self.max_side)
        best = max((f.score for f in faces), default=0.0)
        if best < self.confident and max(image.shape[:2]) > self.retry_side:
            # A face filling most of the detector input comes back missing or as weak, wrong boxes;
            # at a smaller scale the same face is found with a high score. Keep the surer pass.
            retry = self._detect_at(image, self.retry_side)
            if max((f.score for f in retry), default=0.0) > best:
                faces = retry
        return faces

    def _detect_at(self, image: np.ndarray, max_side: int) -> list[DetectedFace]:
        import cv2

        height, width = image.shape[:2]
        scale = min(1.0, max_side / max(height, width))
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        else:
            small = image
        self._net.setInputSize((small.shape[1], small.shape[0]))
        _, rows = self._net.detect(np.ascontiguousarray(small))
        if rows is None:
            return []
        # A resize by `scale` maps pixel centres x -> (x + 0.5) * scale - 0.5; undo that exactly.
        sx, sy = small.shape[1] / width, small.shape[0] / height
        faces = []
        for row in np.asarray(rows, dtype=np.float64):
            x, y, w, h = row[:4]
            points = row[4:14].reshape(5, 2)
            if sx != 1.0 or sy != 1.0:
                x, y = (x + 0.5) / sx - 0.5, (y + 0.5) / sy - 0.5
                w, h = w / sx, h / sy
                points = (points + 0.5) / np.array([sx, sy]) - 0.5
            faces.append(
                DetectedFace(box=(x, y, w, h), landmarks=points.astype(np.float32), score=float(row[14]))
            )
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces


def pick_main_face(faces: list[DetectedFace], image_shape: tuple[int, ...]) -> DetectedFace | None:
    """The face a training crop keeps: large and near the image centre.

    Merit is the box side (square root of its area) times `1 - 0.5 * d`, with `d` the distance of the box
    centre from the image centre as a fraction of the half-diagonal: a face in a corner must be twice as
    large as a central one to win. Scale-free, so the choice does not change when the image is resized.
    """
    if not faces:
        return None
    height, width = image_shape[:2]
    half_diagonal = 0.5 * float(np.hypot(width, height))

    def merit(face: DetectedFace) -> float:
        x, y, w, h = face.box
        distance = float(np.hypot(x + w / 2 - width / 2, y + h / 2 - height / 2)) / half_diagonal
        return float(np.sqrt(face.area)) * (1.0 - 0.5 * min(distance, 1.0))

    return max(faces, key=merit)


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two `(x, y, w, h)` boxes."""
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


# One detector per worker process and setting, so a chunk task does not reload the model per image.
_CACHE: dict[tuple, FaceDetector] = {}


def cached_detector(
    model_path: str | os.PathLike, score_threshold: float, max_side: int = 1024
) -> FaceDetector:
    key = (os.fspath(model_path), float(score_threshold), int(max_side))
    if key not in _CACHE:
        _CACHE[key] = FaceDetector(model_path, score_threshold=score_threshold, max_side=max_side)
    return _CACHE[key]
