"""Procedural face-like images: identity parameters, per-image nuisance, and the renderer.

An identity is a fixed set of parameter groups (face shape, skin, hair, eyes, brows, nose, mouth, ears,
marks, extras). Every image of it is drawn with fresh nuisance: head pose (yaw/pitch projected on a
cylinder/sphere-like head, so features shift and foreshorten while the silhouette stays), in-plane
rotation, scale, shift, expression, background and clothing, lighting, and a degradation level in [0, 1]
(a capture-quality level) that drives occlusion, blur, down-scaling, noise and JPEG quality and widens
how far pose and lighting stray from a frontal, evenly lit shot.

Everything is drawn with cv2 polygons at twice the output size (anti-aliasing by area down-sampling) and
is a pure function of the parameters and a numpy Generator, so the same seed gives the same bytes.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from facepipe.data.synth.draw import (
    _background,
    _bgr,
    _blend,
    _ellipse,
    _face_outline,
    _fill,
    _line,
    _mix,
    _Projector,
)
from facepipe.data.synth.features import (
    _draw_brow,
    _draw_ears,
    _draw_extras,
    _draw_eye,
    _draw_hair_back,
    _draw_hair_front,
    _draw_marks,
    _draw_mouth,
    _draw_nose,
)
from facepipe.data.synth.identity import (
    _BASE,
    GROUPS,
    HAIR_STYLES,
    REDRAWABLE,
    STRUCTURAL,
    Identity,
    Nuisance,
    _group_distance,
    make_relative,
    sample_group,
    sample_identity,
    sample_nuisance,
)

__all__ = [
    "GROUPS",
    "REDRAWABLE",
    "STRUCTURAL",
    "HAIR_STYLES",
    "Identity",
    "Nuisance",
    "_group_distance",
    "make_relative",
    "sample_group",
    "sample_identity",
    "sample_nuisance",
    "render_clean",
    "degrade",
    "encode_jpeg",
    "render",
]


def render_clean(identity: Identity, nz: Nuisance, size: int = 112) -> np.ndarray:
    """Draw the face under `nz`'s pose, expression, scene and lighting (no degradation). BGR uint8."""
    pr = identity.params
    face, skin_p, hair_p = pr["face"], pr["skin"], pr["hair"]
    super_side = 2 * size
    k = super_side / _BASE
    rng = np.random.default_rng(nz.seed)
    img = _background(rng, super_side)
    p = _Projector(face, nz, k)
    skin = np.asarray(skin_p["colour"])
    hair = np.asarray(hair_p["colour"])
    a, b = face["half_width"], face["half_height"]

    # clothing and neck (clothes change from image to image)
    cloth = rng.uniform(10, 240, 3)
    neck_w = a * face["neck_width"]
    shoulders = np.array(
        [
            [-a * 2.6, b * 2.6],
            [-a * 2.2, b * 1.45],
            [-neck_w, b * 1.15],
            [neck_w, b * 1.15],
            [a * 2.2, b * 1.45],
            [a * 2.6, b * 2.6],
        ]
    )
    neck = np.array(
        [[-neck_w, b * 0.4], [neck_w, b * 0.4], [neck_w * 1.05, b * 1.5], [-neck_w * 1.05, b * 1.5]]
    )
    _fill(img, p(neck, weight=0.0), _mix(skin, (0, 0, 0), 0.22))
    _fill(img, p(shoulders, weight=0.0), cloth)
    collar = np.array([[-neck_w * 1.1, b * 1.2], [0, b * 1.2 + rng.uniform(2, 8)], [neck_w * 1.1, b * 1.2]])
    _line(img, p(collar, weight=0.0), _mix(cloth, (0, 0, 0), 0.4), 1.0 * k)

    _draw_hair_back(img, p, face, hair_p)
    _draw_ears(img, p, face, pr["ears"], skin)
    _fill(img, p(_face_outline(face), weight=0.0), skin)
    # soft side shading and cheek blush
    shade = _ellipse(-math.cos(nz.light_angle) * a * 0.75, 0.1 * b, a * 0.45, b * 0.9, n=24)
    _blend(
        img,
        lambda L: _fill(L, p(shade, weight=0.4), _mix(skin, (0, 0, 0), 0.5)),
        skin_p["shade"] * nz.light_strength * 2,
    )
    for s in (-1, 1):
        cheek = _ellipse(s * a * 0.55, b * 0.2, a * 0.22, b * 0.15, n=16)
        _blend(
            img,
            lambda L, cheek=cheek: _fill(L, p(cheek), _mix(skin, (80, 80, 220), 0.5)),
            skin_p["blush"] * 0.5,
        )

    eyes = pr["eyes"]
    for side in (-1, 1):
        _draw_eye(img, p, eyes, side, nz, skin)
        _draw_brow(img, p, eyes, pr["brows"], hair, side, nz)
    tip = _draw_nose(img, p, eyes, pr["nose"], skin, nz.light_angle)
    mouth_y = _draw_mouth(img, p, pr["mouth"], tip, skin, nz)
    _draw_marks(img, p, face, eyes, pr["marks"], skin, mouth_y)
    _draw_extras(img, p, face, eyes, pr["extras"], hair, tip, mouth_y)
    _draw_hair_front(img, p, face, hair_p)

    out = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return _light(out, nz)


def _light(img: np.ndarray, nz: Nuisance) -> np.ndarray:
    side = img.shape[0]
    ramp = np.linspace(-1, 1, side)
    grad = math.cos(nz.light_angle) * ramp[None, :] + math.sin(nz.light_angle) * ramp[:, None]
    f = img.astype(np.float32) / 255.0
    f = f * (1.0 + nz.light_strength * grad[..., None].astype(np.float32))
    f = np.clip(f, 0, 1) ** nz.gamma
    f = (f - 0.5) * nz.contrast + 0.5 + nz.brightness / 255.0
    return np.clip(f * 255.0 + 0.5, 0, 255).astype(np.uint8)


def degrade(img: np.ndarray, nz: Nuisance) -> np.ndarray:
    """Occlusion, blur, down-scaling and noise, each as strong as `nz` says. Returns a new image."""
    rng = np.random.default_rng(nz.seed + 1)
    out = img.copy()
    side = out.shape[0]
    for _ in range(nz.occlusions):
        colour = _bgr(rng.uniform(0, 255, 3))
        kind = rng.integers(3)
        extent = (0.2 + 0.3 * nz.degradation) * side
        if kind == 0:  # horizontal bar (sunglasses, a scarf, a caption)
            y = rng.uniform(0.25, 0.8) * side
            h = rng.uniform(0.1, 0.2) * side
            cv2.rectangle(out, (0, int(y)), (side, int(y + h)), colour, -1)
        elif kind == 1:  # a patch
            x, y = rng.uniform(0, side - extent * 0.6, 2)
            w, h = rng.uniform(0.5, 1.0, 2) * extent
            cv2.rectangle(out, (int(x), int(y)), (int(x + w), int(y + h)), colour, -1)
        else:  # a hand-like blob
            c = rng.uniform(0.2, 0.8, 2) * side
            axes = (int(extent * rng.uniform(0.3, 0.5)), int(extent * rng.uniform(0.4, 0.6)))
            cv2.ellipse(
                out, (int(c[0]), int(c[1])), axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA
            )
    if nz.blur_sigma > 0.05:
        out = cv2.GaussianBlur(out, (0, 0), nz.blur_sigma)
    if nz.downscale < 0.98:
        small = max(8, int(round(side * nz.downscale)))
        out = cv2.resize(out, (small, small), interpolation=cv2.INTER_AREA)
        out = cv2.resize(out, (side, side), interpolation=cv2.INTER_LINEAR)
    if nz.noise_sigma > 0.5:
        noise = rng.normal(0, nz.noise_sigma, out.shape)
        out = np.clip(out.astype(np.float64) + noise, 0, 255).astype(np.uint8)
    return out


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return buf.tobytes()


def render(identity: Identity, nz: Nuisance, size: int = 112) -> bytes:
    """The full image: drawn, lit, degraded and JPEG-encoded at `nz.jpeg_quality`."""
    return encode_jpeg(degrade(render_clean(identity, nz, size), nz), nz.jpeg_quality)
