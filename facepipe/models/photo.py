"""From a photo (or an encoded aligned face) to a registered model's embedding, uncertainty and score.

The path a user's photo takes is the training data's path: YuNet detection (`facepipe.data.align.detect`,
the align stage's detector), the five-point similarity warp to the template that matches the model's
input size (`facepipe.data.align.geometry`), the model's colour order and the training normalisation
(`facepipe.models.embed`). `verify`, `embed` and the registered pyfunc all go through `FaceModel`, so a
photo scores the same from the command line and over HTTP.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.data.align.codec import decode_image
from facepipe.data.align.geometry import TEMPLATES, align_face
from facepipe.data.formats.image_header import size_problem
from facepipe.errors import DataError, FacepipeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class NoFaceError(DataError):
    """The detector found no face (above the score threshold) in a photo."""


def read_photo(path: str | os.PathLike) -> np.ndarray:
    """A photo file as BGR uint8 (EXIF orientation applied); DataError naming the file otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read image: {err.strerror or err}", path=str(path)) from None
    return decode_photo_bytes(data, str(path))


def decode_photo_bytes(data: bytes, where: str) -> np.ndarray:
    """Encoded bytes (JPEG, PNG, ...) -> BGR uint8; oversized or undecodable input is refused."""
    refusal = size_problem(data)
    if refusal is not None and refusal[0] == "too_large":
        raise DataError(refusal[1], path=where)
    image = decode_image(data)
    if image is None:
        raise DataError("not a decodable image", path=where)
    return image


def encoded_bytes(value: Any, where: str) -> bytes:
    """Raw bytes as given, or a base64 string (optionally a `data:image/...;base64,` URI) decoded."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise DataError("image string is not base64", path=where) from None
    raise DataError(f"expected image bytes or a base64 string, got {type(value).__name__}", path=where)


def template_for(input_size: tuple[int, int]) -> str:
    """The alignment template whose crop has the model's input size; arcface (then resized) otherwise."""
    for name, template in TEMPLATES.items():
        if tuple(template.size) == tuple(input_size):
            return name
    return "arcface"


@dataclass(frozen=True)
class AlignedFace:
    crop: np.ndarray  # BGR uint8, the template's size
    score: float  # the detector's score of the kept face


class PhotoAligner:
    """Detect the main face of a photo with YuNet and warp it to the model's template."""

    def __init__(
        self, detector_model: str | os.PathLike, input_size: tuple[int, int], min_score: float = 0.6
    ):
        from facepipe.data.align.detect import cached_detector

        self.detector = cached_detector(detector_model, min_score)
        self.min_score = float(min_score)
        self.template = template_for(input_size)

    def align(self, image: np.ndarray, where: str) -> AlignedFace:
        from facepipe.data.align.detect import pick_main_face

        faces = [f for f in self.detector.detect(image) if f.score >= self.min_score]
        face = pick_main_face(faces, image.shape)
        if face is None:
            raise NoFaceError(f"no face found (detector score >= {self.min_score:g})", path=where)
        crop, _, _ = align_face(image, face.landmarks, self.template)
        return AlignedFace(crop, float(face.score))


def detector_path(explicit: str | os.PathLike | None, configured: str | None) -> Path:
    """The YuNet model to use: the explicit one, else the align stage's configured one."""
    chosen = explicit or configured
    if not chosen:
        raise FacepipeError(
            "no face detector model: pass --detector-model or set align.detector_model in params.yaml"
        )
    path = Path(chosen)
    if not path.is_file():
        raise FacepipeError(f"detector model not found: {path}")
    return path


class FaceModel:
    """A backbone bundle and its uncertainty head (when there is one), loaded from a local folder."""

    def __init__(self, root: str | os.PathLike, head_dir: str | os.PathLike | None = None) -> None:
        """`head_dir`: the uncertainty head, when it is not at or below `root` (a pyfunc's artifacts)."""
        from facepipe.models.bundle import find_bundle, load_bundle
        from facepipe.uncertainty.head_io import find_heads, load_head

        root = Path(root)
        if not root.exists():
            raise FacepipeError(f"model {root} is not an existing folder")
        self.backbone, self.info, _ = load_bundle(find_bundle(root))
        heads = [Path(head_dir)] if head_dir else find_heads(root)
        self.head = load_head(heads[-1], self.info) if heads else None  # a run folder: the newest head
        self.method: str | None = None if self.head is None else str(self.head.method)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.info.input_size)

    @property
    def score_name(self) -> str:
        """What `score` computes: cosine for a bare backbone, else the method's own pair score."""
        from facepipe.uncertainty.registry import get_method

        return "cosine" if self.method is None else get_method(self.method).score_name

    def to_input(self, crops_bgr: list[np.ndarray]) -> np.ndarray:
        """BGR crops -> uint8 NHWC of the model's input size and colour order."""
        import cv2

        h, w = self.input_size
        out = np.empty((len(crops_bgr), h, w, 3), dtype=np.uint8)
        for i, crop in enumerate(crops_bgr):
            if crop.shape[:2] != (h, w):
                crop = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)
            out[i] = crop[..., ::-1] if self.info.color_order == "RGB" else crop
        return out

    def forward(self, x: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalised NCHW float tensor -> (raw embeddings, head output u (σ² or κ) or None)."""
        import torch

        with torch.no_grad():
            emb, fmap = self.backbone.forward_features(torch.as_tensor(x, dtype=torch.float32))
            unc = None if self.head is None else self.head.uncertainty(emb, fmap).reshape(len(emb), -1)
        return emb.float().numpy(), None if unc is None else unc.float().numpy()

    def embed(self, images_u8: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 NHWC (model colour order) -> embedding, u (head output) and uncertainty (one scalar each,
        larger = less reliable; NaN without a head)."""
        from facepipe.models.preprocess import to_model_input

        emb, unc = self.forward(to_model_input(images_u8))
        return {"embedding": emb, "u": unc, "uncertainty": self.uncertainty_scalar(unc, len(emb))}

    def uncertainty_scalar(self, u: np.ndarray | None, n: int) -> np.ndarray:
        import torch

        from facepipe.uncertainty.registry import get_method

        if u is None or self.method is None:
            return np.full(n, np.nan)
        scalar = get_method(self.method).uncertainty_scalar(torch.from_numpy(u))
        return scalar.double().numpy().reshape(n)

    def score(self, emb_a: np.ndarray, u_a: Any, emb_b: np.ndarray, u_b: Any) -> np.ndarray:
        """Similarity of row-aligned pairs (higher = more alike): cosine or the method's pair score."""
        from facepipe.uncertainty.registry import score_pairs

        mu_a, mu_b = l2_normalise(emb_a), l2_normalise(emb_b)
        if self.method is None:
            return np.einsum("ij,ij->i", mu_a, mu_b).astype(np.float64)
        return score_pairs(self.method, mu_a, u_a, mu_b, u_b)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def list_photos(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder` (recursively, by suffix), in a stable sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FacepipeError(f"{folder} is not a folder")
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
