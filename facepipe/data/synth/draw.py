"""Generated faces, part 2: face coordinates to pixels (pose on a rounded head), cv2 drawing primitives
at sub-pixel precision, and backgrounds."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from facepipe.data.synth.identity import (
    _FACE_CENTRE,
    _FACE_SCALE,
    _SUBPIXEL,
    Nuisance,
)

# --------------------------------------------------------------------------------------- drawing


class _Projector:
    """Face coordinates (u right, v down, 112 units, origin at the face centre) → supersampled pixels.

    Interior features sit on a rounded head: yaw/pitch move them along sin() of their angle and shrink
    them toward the far side, and `depth` (the nose) moves further; the silhouette (weight 0) barely moves.
    """

    def __init__(self, face: dict[str, Any], nz: Nuisance, px_per_unit: float) -> None:
        self.rh = face["half_width"] * 1.12
        self.rv = face["half_height"] * 1.35
        self.yaw, self.pitch = nz.yaw, nz.pitch
        r = math.radians(nz.roll)
        self.rot = (
            np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]]) * nz.scale * _FACE_SCALE
        )
        self.offset = np.array([_FACE_CENTRE[0] + nz.shift_x, _FACE_CENTRE[1] + nz.shift_y])
        self.k = px_per_unit

    def __call__(self, pts: np.ndarray, depth: float = 0.0, weight: float = 1.0) -> np.ndarray:
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        u, v = pts[:, 0], pts[:, 1]
        phi = np.arcsin(np.clip(u / self.rh, -0.98, 0.98))
        theta = np.arcsin(np.clip(v / self.rv, -0.98, 0.98))
        x_feat = self.rh * np.sin(phi + self.yaw) + depth * math.sin(self.yaw)
        y_feat = self.rv * np.sin(theta + self.pitch) + depth * math.sin(self.pitch)
        x_sil = u * (1 - 0.1 * abs(self.yaw)) + 0.12 * self.rh * math.sin(self.yaw)
        y_sil = v * (1 - 0.05 * abs(self.pitch)) + 0.12 * self.rv * math.sin(self.pitch)
        xy = np.stack([weight * x_feat + (1 - weight) * x_sil, weight * y_feat + (1 - weight) * y_sil], 1)
        return (xy @ self.rot.T + self.offset) * self.k


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 28) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


def _fixed(pts: np.ndarray) -> np.ndarray:
    return np.round(pts * (1 << _SUBPIXEL)).astype(np.int32)


def _fill(img: np.ndarray, pts: np.ndarray, colour: Any) -> None:
    cv2.fillPoly(img, [_fixed(pts)], _bgr(colour), cv2.LINE_AA, _SUBPIXEL)


def _line(img: np.ndarray, pts: np.ndarray, colour: Any, width: float, closed: bool = False) -> None:
    cv2.polylines(img, [_fixed(pts)], closed, _bgr(colour), max(1, int(round(width))), cv2.LINE_AA, _SUBPIXEL)


def _blend(img: np.ndarray, draw: Any, alpha: float) -> None:
    """Draw on a copy and mix it in: translucent shading, blush, stubble."""
    if alpha <= 0:
        return
    layer = img.copy()
    draw(layer)
    cv2.addWeighted(layer, alpha, img, 1 - alpha, 0, dst=img)


def _bgr(colour: Any) -> tuple[float, float, float]:
    c = np.clip(np.asarray(colour, dtype=np.float64), 0, 255)
    return (float(c[0]), float(c[1]), float(c[2]))


def _mix(a: Any, b: Any, t: float) -> np.ndarray:
    return np.asarray(a, dtype=np.float64) * (1 - t) + np.asarray(b, dtype=np.float64) * t


def _face_outline(face: dict[str, Any], grow: float = 0.0, n: int = 72) -> np.ndarray:
    a, b = face["half_width"] + grow, face["half_height"] + grow
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    s = np.sin(t)
    lower = np.clip(s, 0, 1)
    narrow = 1 - (1 - face["jaw"]) * lower**1.6 - 0.25 * face["chin"] * lower**6
    u = a * np.cos(t) * narrow
    v = np.where(s < 0, b * face["forehead"] * s, b * s * (1 + 0.06 * face["chin"] * lower**8))
    return np.stack([u, v], 1)


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """Random scene: base colour, a linear gradient and a few blurred clutter shapes."""
    base = rng.uniform(20, 235, 3)
    direction = rng.uniform(0, 2 * math.pi)
    # a linear gradient is exact at low resolution; build it small and scale up (cheaper)
    ramp = np.linspace(-1, 1, 16)
    grad = math.cos(direction) * ramp[None, :] + math.sin(direction) * ramp[:, None]
    small = base[None, None, :] + grad[..., None] * rng.uniform(-60, 60, 3)[None, None, :]
    small = np.clip(small, 0, 255).astype(np.uint8)
    img = cv2.resize(small, (side, side), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(0, 5))):
        colour = rng.uniform(0, 255, 3)
        kind = rng.integers(3)
        c = rng.uniform(0, side, 2)
        size = rng.uniform(0.08, 0.35) * side
        if kind == 0:
            cv2.circle(img, (int(c[0]), int(c[1])), int(size), _bgr(colour), -1, cv2.LINE_AA)
        elif kind == 1:
            p2 = c + rng.uniform(-size, size, 2)
            cv2.rectangle(img, (int(c[0]), int(c[1])), (int(p2[0]), int(p2[1])), _bgr(colour), -1)
        else:
            p2 = rng.uniform(0, side, 2)
            width = max(1, int(rng.uniform(0.01, 0.06) * side))
            cv2.line(img, (int(c[0]), int(c[1])), (int(p2[0]), int(p2[1])), _bgr(colour), width, cv2.LINE_AA)
    k = int(side * 0.03) * 2 + 1
    return cv2.GaussianBlur(img, (k, k), 0)
