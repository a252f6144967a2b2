"""Five-point alignment geometry: templates, the least-squares similarity transform, the warp.

Templates (pixel coordinates of the aligned crop, image order: image-left eye, image-right eye, nose,
image-left mouth corner, image-right mouth corner):
- `arcface`   112x112, the InsightFace reference points (the default);
- `sphereface` 112 high x 96 wide, the SphereFace/PFE reference points (ArcFace's minus 8 px in x);
- `probface`  96x96: ProbFace trains on ArcFace 112x112 crops resized to 96x96, so its template is the
  ArcFace one scaled by 96/112; warping straight to it avoids a second resampling.

The transform is the closed-form least-squares similarity (rotation, uniform scale, translation, no
reflection; Umeyama 1991). In 2-D, writing points as complex numbers z, it is `w = a*z + b`, whose
least-squares `a` is `sum(conj(z_c) * w_c) / sum(|z_c|^2)` over the centred points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facepipe.errors import FacepipeError

__all__ = [
    "Template",
    "TEMPLATES",
    "get_template",
    "similarity_transform",
    "apply_transform",
    "align_face",
    "landmark_error",
]

_ARCFACE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)


@dataclass(frozen=True)
class Template:
    """An alignment target: output size `(height, width)` and the five reference points `(5, 2)`."""

    name: str
    size: tuple[int, int]
    points: tuple[tuple[float, float], ...]

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.points, dtype=np.float64)


def _shifted(dx: float) -> tuple[tuple[float, float], ...]:
    return tuple((x + dx, y) for x, y in _ARCFACE_112)


def _scaled(factor: float) -> tuple[tuple[float, float], ...]:
    return tuple((x * factor, y * factor) for x, y in _ARCFACE_112)


TEMPLATES: dict[str, Template] = {
    "arcface": Template("arcface", (112, 112), _ARCFACE_112),
    "sphereface": Template("sphereface", (112, 96), _shifted(-8.0)),
    "probface": Template("probface", (96, 96), _scaled(96.0 / 112.0)),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise FacepipeError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}") from None


def _as_template(template: Template | str) -> Template:
    return get_template(template) if isinstance(template, str) else template


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix `M` of the similarity minimising `sum |M [src; 1] - dst|^2`.

    Raises ValueError for degenerate input (fewer than 2 points, all points equal, non-finite values).
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need matching point sets of at least 2 points, got {src.shape} and {dst.shape}")
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        raise ValueError("landmarks contain non-finite values")
    z = src[:, 0] + 1j * src[:, 1]
    w = dst[:, 0] + 1j * dst[:, 1]
    z_mean, w_mean = z.mean(), w.mean()
    zc, wc = z - z_mean, w - w_mean
    spread = float(np.sum(np.abs(zc) ** 2))
    if spread < 1e-12:
        raise ValueError("landmarks are degenerate (all points coincide)")
    a = np.sum(np.conj(zc) * wc) / spread
    b = w_mean - a * z_mean
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]], dtype=np.float64)


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map `(N, 2)` points through a 2x3 affine matrix."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ matrix[:, :2].T + matrix[:, 2]


def align_face(
    image: np.ndarray, landmarks: np.ndarray, template: Template | str = "arcface"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warp `image` so `landmarks` land on the template.

    Returns `(crop, matrix, warped_landmarks)`: the aligned crop of the template's size, the 2x3 matrix
    from source to crop pixels, and the landmarks in crop pixels.
    """
    import cv2

    template = _as_template(template)
    matrix = similarity_transform(landmarks, template.array)
    height, width = template.size
    crop = cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    return crop, matrix, apply_transform(matrix, landmarks)


def landmark_error(warped: np.ndarray, template: Template | str = "arcface") -> np.ndarray:
    """Per-point distance (crop pixels) between warped landmarks and the template's points."""
    template = _as_template(template)
    return np.linalg.norm(np.asarray(warped, dtype=np.float64).reshape(5, 2) - template.array, axis=1)
