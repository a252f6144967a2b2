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

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

# Parameter groups of an identity. Relatives re-draw some of the REDRAWABLE groups and keep the rest
# (skin and extras always stay, hair often: a family look, which is what makes them hard negatives).
GROUPS = ("face", "skin", "hair", "eyes", "brows", "nose", "mouth", "ears", "marks", "extras")
REDRAWABLE = ("face", "hair", "eyes", "brows", "nose", "mouth", "ears", "marks")
STRUCTURAL = ("face", "eyes", "nose", "mouth")

# Geometry is expressed in units of a 112-pixel canvas, whatever the output size.
_BASE = 112.0
_FACE_CENTRE = (56.0, 58.0)
# Aligned face crops are mostly face: the drawn head is enlarged by this factor around its centre.
_FACE_SCALE = 1.4
_SUBPIXEL = 4  # cv2 drawing shift: coordinates carry 4 fractional bits

_SKIN_TONES = np.array(  # BGR, pale to dark
    [(196, 214, 242), (160, 188, 230), (120, 158, 208), (88, 122, 170), (58, 84, 124), (40, 58, 90)],
    dtype=np.float64,
)
_HAIR_COLOURS = np.array(  # BGR: black, dark brown, brown, blond, red, grey, auburn
    [
        (22, 22, 26),
        (30, 44, 66),
        (48, 78, 120),
        (120, 186, 222),
        (40, 72, 170),
        (165, 165, 168),
        (40, 55, 110),
    ],
    dtype=np.float64,
)
_IRIS_COLOURS = np.array(  # BGR: brown, dark brown, blue, green, grey
    [(40, 70, 110), (25, 35, 55), (170, 120, 60), (80, 140, 70), (140, 140, 130)], dtype=np.float64
)
HAIR_STYLES = ("bald", "short", "long", "fringe", "curly", "side_part")


# --------------------------------------------------------------------------------------- identity


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_group(name: str, rng: np.random.Generator) -> dict[str, Any]:
    """Draw one parameter group from its prior (plain floats/ints/lists, JSON-able)."""
    if name == "face":
        return {
            "half_width": _u(rng, 18.5, 25.0),
            "half_height": _u(rng, 24.0, 31.0),
            "jaw": _u(rng, 0.55, 0.97),  # width at the chin relative to the cheeks
            "chin": _u(rng, 0.0, 1.0),  # 0 round, 1 pointed
            "forehead": _u(rng, 0.85, 1.12),
            "neck_width": _u(rng, 0.45, 0.75),
        }
    if name == "skin":
        tone = _u(rng, 0.0, 1.0) * (len(_SKIN_TONES) - 1)
        i = min(int(tone), len(_SKIN_TONES) - 2)
        base = _SKIN_TONES[i] * (1 - (tone - i)) + _SKIN_TONES[i + 1] * (tone - i)
        base = np.clip(base + rng.normal(0, 8, 3), 20, 250)
        return {"colour": base.tolist(), "blush": _u(rng, 0.0, 0.45), "shade": _u(rng, 0.05, 0.3)}
    if name == "hair":
        colour = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] + rng.normal(0, 10, 3)
        return {
            "style": int(rng.choice(len(HAIR_STYLES), p=[0.08, 0.26, 0.22, 0.16, 0.12, 0.16])),
            "colour": np.clip(colour, 5, 250).tolist(),
            "hairline": _u(rng, 0.42, 0.8),  # fraction of the half-height above the centre
            "volume": _u(rng, 0.4, 1.6),
            "part": _u(rng, -1.0, 1.0),
            "length": _u(rng, 0.6, 1.4),
            "strand_seed": int(rng.integers(1 << 31)),
        }
    if name == "eyes":
        return {
            "spacing": _u(rng, 8.0, 12.0),  # half the distance between eye centres
            "height": _u(rng, -7.0, -1.0),
            "rx": _u(rng, 3.8, 6.4),
            "ry": _u(rng, 1.7, 3.4),
            "tilt": _u(rng, -0.28, 0.28),
            "iris": (_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] + rng.normal(0, 10, 3)).tolist(),
            "iris_size": _u(rng, 0.42, 0.72),
            "lid": _u(rng, 0.0, 1.0),
            "bags": _u(rng, 0.0, 1.0),
        }
    if name == "brows":
        return {
            "gap": _u(rng, 2.6, 6.5),
            "thickness": _u(rng, 0.7, 2.6),
            "length": _u(rng, 0.9, 1.6),
            "arch": _u(rng, -0.6, 1.6),
            "slant": _u(rng, -0.35, 0.35),
            "darkness": _u(rng, 0.3, 1.0),
            "inner": _u(rng, -1.5, 1.5),
        }
    if name == "nose":
        return {
            "length": _u(rng, 7.0, 14.0),
            "width": _u(rng, 2.8, 6.8),
            "bridge": _u(rng, 0.0, 1.0),
            "nostril": _u(rng, 0.5, 1.7),
            "tip": _u(rng, 0.0, 1.0),
            "depth": _u(rng, 3.0, 7.5),
            "hook": _u(rng, -1.0, 1.0),
        }
    if name == "mouth":
        return {
            "gap": _u(rng, 3.5, 8.5),  # below the nose tip
            "half_width": _u(rng, 5.0, 11.5),
            "upper": _u(rng, 0.5, 2.3),
            "lower": _u(rng, 0.7, 3.2),
            "curve": _u(rng, -1.4, 1.4),
            "redness": _u(rng, 0.0, 1.0),
            "cupid": _u(rng, 0.0, 1.0),
        }
    if name == "ears":
        return {"size": _u(rng, 3.8, 7.5), "height": _u(rng, -3.5, 3.0), "protrude": _u(rng, 0.0, 1.0)}
    if name == "marks":
        moles = [
            [_u(rng, -0.75, 0.75), _u(rng, -0.6, 0.75), _u(rng, 0.5, 1.4)] for _ in range(rng.integers(0, 4))
        ]
        return {
            "moles": moles,
            "freckles": _u(rng, 0.3, 1.0) if rng.random() < 0.25 else 0.0,
            "freckle_seed": int(rng.integers(1 << 31)),
            "wrinkles": _u(rng, 0.0, 1.0) if rng.random() < 0.4 else 0.0,
            "folds": _u(rng, 0.0, 1.0),
            "dimple": _u(rng, 0.0, 1.0) if rng.random() < 0.2 else 0.0,
        }
    if name == "extras":
        beard = int(rng.choice(4, p=[0.6, 0.15, 0.12, 0.13]))  # none, stubble, moustache, full
        glasses = int(rng.choice(3, p=[0.8, 0.1, 0.1]))  # none, round, rectangular
        frame = rng.uniform(10, 200, 3) if rng.random() < 0.5 else np.full(3, _u(rng, 10, 50))
        return {
            "beard": beard,
            "beard_density": _u(rng, 0.4, 1.0),
            "glasses": glasses,
            "frame": frame.tolist(),
        }
    raise KeyError(f"unknown parameter group {name!r}")


@dataclass
class Identity:
    """A face identity: a dict of parameter groups. `parent` names the identity it is a relative of."""

    params: dict[str, dict[str, Any]]
    parent: int | None = None
    redrawn: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_identity(rng: np.random.Generator) -> Identity:
    return Identity({name: sample_group(name, rng) for name in GROUPS})


_RELATIVE_CANDIDATES = 6


def _group_distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Rough dissimilarity of two draws of one group: relative differences of its numbers, summed."""
    total = 0.0
    for key, va in a.items():
        vb = b[key]
        if key.endswith("seed"):
            continue
        if isinstance(va, list):
            if not va or not vb or isinstance(va[0], list) or len(va) != len(vb):  # moles: compare counts
                total += abs(len(va) - len(vb)) / 3.0
            else:  # colours
                total += float(np.mean(np.abs(np.subtract(va, vb)))) / 128.0
        else:
            total += abs(va - vb) / (abs(va) + abs(vb) + 1e-9)
    return total


def make_relative(
    identity: Identity, rng: np.random.Generator, n_groups: int = 3, parent: int | None = None
) -> Identity:
    """A relative: `n_groups` groups re-drawn, every other parameter kept.

    At least two of them (one if n_groups is 1) are structural (face shape, eyes, nose, mouth), so a
    relative is a similar-looking different person, not a twin that differs by a mole and an ear.
    """
    if not 1 <= n_groups <= len(REDRAWABLE):
        raise ValueError(f"n_groups must be in 1..{len(REDRAWABLE)}, got {n_groups}")
    n_struct = min(n_groups, 2)
    chosen = [str(g) for g in rng.choice(STRUCTURAL, size=n_struct, replace=False)]
    rest = [g for g in REDRAWABLE if g not in chosen]
    chosen += [str(g) for g in rng.choice(rest, size=n_groups - n_struct, replace=False)]
    params = copy.deepcopy(identity.params)
    for name in chosen:
        # of a few fresh draws keep the one farthest from the parent's: a redrawn feature should show
        candidates = [sample_group(name, rng) for _ in range(_RELATIVE_CANDIDATES)]
        params[name] = max(candidates, key=lambda c, old=params[name]: _group_distance(old, c))
    order = tuple(g for g in GROUPS if g in chosen)
    return Identity(params, parent=parent, redrawn=order)


# --------------------------------------------------------------------------------------- nuisance


@dataclass
class Nuisance:
    """Everything that varies between two images of one identity. Stored in the sidecar Parquet."""

    degradation: float
    yaw: float
    pitch: float
    roll: float  # degrees
    scale: float
    shift_x: float  # output-canvas pixels at 112
    shift_y: float
    smile: float
    eye_open: float
    brow_raise: float
    light_angle: float
    light_strength: float
    gamma: float
    brightness: float
    contrast: float
    blur_sigma: float
    downscale: float  # fraction of the side kept before up-scaling back (1 = none)
    noise_sigma: float
    occlusions: int
    jpeg_quality: int
    seed: int = field(default=0)  # drives background, clothing and occluder shapes

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


# How far pose and lighting may stray, as a multiple of the ranges in `sample_nuisance`, at degradation
# 0 and 1 (linear between): a clean capture is near-frontal and evenly lit, the worst one uses the whole
# range. (A worst spread of 1.25 cost the backbone its 90% on all pairs of synth_val: 0.894 on seed 0.)
_POSE_SPREAD_CLEAN = 0.35
_POSE_SPREAD_WORST = 1.0


def sample_nuisance(rng: np.random.Generator, degradation: float) -> Nuisance:
    """Draw one capture of an identity; `degradation` sets how bad the capture is.

    The level is a capture-quality level, as face-quality work defines it: it scales the damage (blur,
    down-scaling, noise, occluders, JPEG) and also how far pose and lighting stray from a frontal, evenly
    lit shot. With pose and lighting drawn independently of it, what hurts recognition among "clean"
    images was unrelated to the level, and no uncertainty estimate could follow it there.
    """
    d = float(np.clip(degradation, 0.0, 1.0))
    strength = lambda: _u(rng, 0.7, 1.0)  # noqa: E731 - each damage gets its own jitter
    spread = _POSE_SPREAD_CLEAN + (_POSE_SPREAD_WORST - _POSE_SPREAD_CLEAN) * d
    sym = lambda half: _u(rng, -half * spread, half * spread)  # noqa: E731
    return Nuisance(
        degradation=d,
        yaw=sym(0.32),
        pitch=sym(0.16),
        # residual misalignment of a 5-point-aligned crop: a few pixels and degrees, not a free placement
        roll=sym(6.0),
        scale=float(np.exp(rng.uniform(-0.07, 0.07))),
        shift_x=_u(rng, -3.5, 3.5),
        shift_y=_u(rng, -3.5, 3.5),
        # expression moves the same features that tell identities apart (mouth curve, eye height, brow
        # position): kept well inside the identity ranges so that the features stay a reliable cue
        smile=_u(rng, -0.2, 0.4),
        eye_open=_u(rng, 0.8, 1.05),
        brow_raise=_u(rng, -0.35, 0.5),
        light_angle=_u(rng, 0.0, 2 * math.pi),
        light_strength=_u(rng, 0.0, 0.4 * spread),
        gamma=float(np.exp(sym(0.35))),
        brightness=sym(18.0),
        contrast=1.0 + sym(0.17) - 0.02 * spread,
        blur_sigma=3.2 * d**1.4 * strength() if d > 0.05 else 0.0,
        downscale=1.0 / (1.0 + 4.0 * d**1.5 * strength()),
        noise_sigma=20.0 * d * strength(),
        # occluders only from moderate damage on: a "clean" image (< 0.3) keeps its whole face
        occlusions=int(rng.binomial(2, min(1.0, 0.8 * d**1.5))) if d > 0.35 else 0,
        jpeg_quality=int(round(95 - 80 * d * strength())),
        seed=int(rng.integers(1 << 31)),
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


def _draw_hair_back(img: np.ndarray, p: _Projector, face: dict, hair: dict) -> None:
    style = HAIR_STYLES[hair["style"]]
    colour = np.asarray(hair["colour"])
    a, b = face["half_width"], face["half_height"]
    vol = hair["volume"]
    if style == "long":
        length = b * (0.9 + 0.6 * hair["length"])
        w = a * (1.12 + 0.12 * vol)
        t = np.linspace(math.pi, 2 * math.pi, 24)
        top = np.stack([w * np.cos(t), b * face["forehead"] * (1.1 + 0.08 * vol) * np.sin(t)], 1)
        sides = np.array(
            [[w * 1.04, length * 0.6], [w * 0.95, length], [-w * 0.95, length], [-w * 1.04, length * 0.6]]
        )
        _fill(img, p(np.vstack([top, sides]), weight=0.0), _mix(colour, (0, 0, 0), 0.25))
    elif style == "curly":
        rng = np.random.default_rng(hair["strand_seed"])
        for ang in np.linspace(math.pi * 0.9, math.pi * 2.1, 16):
            r = 5.0 + 3.0 * vol + rng.uniform(-1, 1)
            cx = (a * 1.02) * math.cos(ang)
            cy = b * face["forehead"] * 0.98 * math.sin(ang) + (3 if math.sin(ang) > -0.3 else 0)
            _fill(
                img, p(_ellipse(cx, cy, r, r, n=16), weight=0.0), _mix(colour, (0, 0, 0), 0.15 * rng.random())
            )


def _draw_hair_front(img: np.ndarray, p: _Projector, face: dict, hair: dict) -> None:
    style = HAIR_STYLES[hair["style"]]
    colour = np.asarray(hair["colour"])
    a, b = face["half_width"], face["half_height"] * face["forehead"]
    vol = hair["volume"]
    hairline = hair["hairline"] * b
    if style == "bald":
        # a fringe of hair around the sides only
        for side in (-1, 1):
            pts = np.array(
                [
                    [side * a * 1.02, -b * 0.5],
                    [side * a * 1.06, 0.0],
                    [side * a * 0.9, 0.0],
                    [side * a * 0.88, -b * 0.45],
                ]
            )
            _fill(img, p(pts, weight=0.3), colour)
        return
    if style == "fringe":
        hairline = b * 0.3
    cap_r_u, cap_r_v = a * (1.04 + 0.06 * vol), b * (1.04 + 0.1 * vol)
    t = np.linspace(math.pi, 2 * math.pi, 26)
    outer = np.stack([cap_r_u * np.cos(t), cap_r_v * np.sin(t)], 1)
    # hairline from the right temple back to the left one (points go right→left)
    us = np.linspace(a * 1.0, -a * 1.0, 21)
    line_v = -hairline + 0.45 * hairline * (np.abs(us) / a) ** 2.5
    if style == "side_part":
        line_v = line_v + 0.25 * hairline * hair["part"] * (us / a)
    if style == "fringe":
        rng = np.random.default_rng(hair["strand_seed"])
        line_v = line_v + np.where(np.arange(us.size) % 2 == 0, 0, -2.5 - rng.uniform(0, 2, us.size))
    sideburn = np.array([[a * 1.04, b * 0.05], [a * 0.86, b * 0.05]])
    sideburn_l = np.array([[-a * 0.86, b * 0.05], [-a * 1.04, b * 0.05]])
    inner = np.vstack([sideburn, np.stack([us, line_v], 1), sideburn_l])
    pts_outer = p(outer, weight=0.0)
    pts_inner = p(inner, weight=0.8)
    poly = np.vstack([pts_outer, pts_inner])
    _fill(img, poly, colour)
    # strands: a fixed per-identity pattern of lighter and darker lines on the cap
    rng = np.random.default_rng(hair["strand_seed"] + 1)
    for _ in range(7):
        u0 = rng.uniform(-0.8, 0.8) * a
        v0 = -b * rng.uniform(0.75, 1.0)
        v1 = -hairline * rng.uniform(0.9, 1.0)
        pts = np.array([[u0, v0], [u0 + rng.uniform(-4, 4), (v0 + v1) / 2], [u0 + rng.uniform(-6, 6), v1]])
        shade = (255, 255, 255) if rng.random() < 0.5 else (0, 0, 0)
        _line(img, p(pts, weight=0.5), _mix(colour, shade, 0.22), 1.0 * p.k)
    if style == "side_part":
        x = hair["part"] * a * 0.5
        _line(
            img,
            p(np.array([[x, -b * 1.02], [x * 1.1, -hairline * 1.05]]), weight=0.6),
            _mix(colour, (0, 0, 0), 0.5),
            0.8 * p.k,
        )


def _draw_ears(img: np.ndarray, p: _Projector, face: dict, ears: dict, skin: np.ndarray) -> None:
    a = face["half_width"]
    size = ears["size"]
    for side in (-1, 1):
        # the ear on the far side hides behind the head; the near one shows more
        visible = float(np.clip(1.0 - side * p.yaw * 1.8, 0.15, 1.6))
        cx = side * (a * 0.97 + size * 0.25 * ears["protrude"] * visible)
        pts = _ellipse(cx, ears["height"], size * 0.45 * visible, size, n=20)
        _fill(img, p(pts, weight=0.0), _mix(skin, (0, 0, 0), 0.12))
        inner = _ellipse(cx + side * size * 0.05, ears["height"], size * 0.22 * visible, size * 0.6, n=16)
        _line(img, p(inner, weight=0.0), _mix(skin, (0, 0, 0), 0.35), 0.6 * p.k, closed=True)


def _draw_eye(img: np.ndarray, p: _Projector, eyes: dict, side: int, nz: Nuisance, skin: np.ndarray) -> None:
    cx, cy = side * eyes["spacing"], eyes["height"]
    rx, ry = eyes["rx"], eyes["ry"] * nz.eye_open
    tilt = -side * eyes["tilt"]
    c, s = math.cos(tilt), math.sin(tilt)
    rot = np.array([[c, -s], [s, c]])

    def place(local: np.ndarray) -> np.ndarray:
        return p(local @ rot.T + (cx, cy))

    t = np.linspace(0, 2 * math.pi, 28, endpoint=False)
    # almond: flatter lower lid
    lx, ly = rx * np.cos(t), np.where(np.sin(t) < 0, ry * np.sin(t), 0.75 * ry * np.sin(t))
    almond = np.stack([lx, ly], 1)
    if eyes["bags"] > 0.6:
        bag = np.stack([rx * 0.8 * np.cos(t[:15]), ry * 0.9 + 1.2 * np.sin(t[:15])], 1)
        _blend(img, lambda L: _line(L, place(bag), _mix(skin, (0, 0, 0), 0.5), 0.7 * p.k), 0.5)
    _fill(img, place(almond), (235, 238, 240))
    # iris and pupil clipped to the almond, shifted by gaze with the yaw
    gaze = -0.25 * rx * math.sin(p.yaw)
    ir = ry * 0 + eyes["iris_size"] * rx
    iris = _ellipse(gaze, 0.0, ir, ir, n=24)
    lim = np.interp(np.abs(iris[:, 0]), [0, rx], [1, 0]) ** 0.5
    iris[:, 1] = np.clip(iris[:, 1], -ry * lim, 0.75 * ry * lim)
    _fill(img, place(iris), eyes["iris"])
    pupil = _ellipse(gaze, 0.0, ir * 0.45, ir * 0.45, n=16)
    pupil[:, 1] = np.clip(pupil[:, 1], -ry * 0.95, 0.7 * ry)
    _fill(img, place(pupil), (15, 15, 15))
    _fill(img, place(_ellipse(gaze + ir * 0.3, -ir * 0.3, ir * 0.18, ir * 0.18, n=10)), (250, 250, 250))
    # upper lid line (dark, thicker) and lower lid
    upper = almond[t >= math.pi - 1e-9]
    upper = np.vstack([[rx, 0.0], upper[::-1][::-1], [rx, 0.0]])[1:-1]
    _line(img, place(np.vstack([[-rx, 0], almond[(t > math.pi)], [rx, 0]])), (25, 25, 30), 1.1 * p.k)
    if eyes["lid"] > 0.35:
        crease = np.stack([rx * 1.05 * np.cos(t[14:]), ry * (1.2 + 0.8 * eyes["lid"]) * np.sin(t[14:])], 1)
        _line(img, place(crease), _mix(skin, (0, 0, 0), 0.45), 0.6 * p.k)


def _draw_brow(
    img: np.ndarray, p: _Projector, eyes: dict, brows: dict, hair: np.ndarray, side: int, nz: Nuisance
) -> None:
    length = eyes["rx"] * brows["length"]
    cx = side * (eyes["spacing"] + 0.15 * length)
    cy = eyes["height"] - eyes["ry"] - brows["gap"] - 0.6 * nz.brow_raise
    xs = np.linspace(-1, 1, 12)
    # inner end (toward the nose) first; arch is a parabola, slant tilts the brow
    x = cx - side * xs * length
    arch = brows["arch"] * (1 - xs**2) * 1.6
    y = cy - arch + brows["slant"] * xs * 2.5 + brows["inner"] * 0.5 * np.clip(xs, 0, 1) * -1
    thick = brows["thickness"] * (1.0 - 0.45 * np.clip(-xs, 0, 1) - 0.1 * np.clip(xs, 0, 1))
    top = np.stack([x, y - thick / 2], 1)
    bottom = np.stack([x, y + thick / 2], 1)[::-1]
    colour = _mix(hair, (10, 10, 10), brows["darkness"] * 0.7)
    _fill(img, p(np.vstack([top, bottom])), colour)


def _draw_nose(
    img: np.ndarray, p: _Projector, eyes: dict, nose: dict, skin: np.ndarray, light: float
) -> float:
    top = eyes["height"] + 1.0
    tip = top + nose["length"]
    w = nose["width"]
    depth = nose["depth"]
    dark = _mix(skin, (0, 0, 0), 0.35)
    # bridge: a shaded side line; which side depends on the light direction
    side = 1 if math.cos(light) > 0 else -1
    if nose["bridge"] > 0.25:
        ys = np.linspace(top + 1, tip - 1.5, 8)
        xs = side * (0.6 * w * 0.4 + nose["hook"] * 0.6 * np.sin(np.linspace(0, math.pi, 8)))
        pts = p(np.stack([xs, ys], 1), depth=depth * 0.6)
        _blend(img, lambda L: _line(L, pts, dark, 1.0 * p.k), 0.5 + 0.4 * nose["bridge"])
    # tip: a rounded bottom arc and two nostrils
    ang = np.linspace(0.15 * math.pi, 0.85 * math.pi, 12)
    tip_r = w * (0.35 + 0.25 * nose["tip"])
    arc = np.stack([w * 0.6 * np.cos(ang) * 1.4, tip - tip_r + tip_r * np.sin(ang)], 1)
    _blend(img, lambda L: _line(L, p(arc, depth=depth), dark, 1.1 * p.k), 0.85)
    for s in (-1, 1):
        nostril = _ellipse(
            s * w * 0.42, tip - 0.3, 0.9 * nose["nostril"], 0.55 * nose["nostril"], s * 0.3, n=12
        )
        _fill(img, p(nostril, depth=depth * 0.7), _mix(skin, (0, 0, 0), 0.6))
        wing = _ellipse(s * w * 0.62, tip - 1.2, w * 0.28, w * 0.32, n=12)[2:9]
        _blend(img, lambda L, wing=wing: _line(L, p(wing, depth=depth * 0.5), dark, 0.8 * p.k), 0.5)
    return tip


def _draw_mouth(
    img: np.ndarray, p: _Projector, mouth: dict, tip: float, skin: np.ndarray, nz: Nuisance
) -> float:
    cy = tip + mouth["gap"]
    w = mouth["half_width"] * (1 + 0.08 * nz.smile)
    curve = mouth["curve"] + 1.2 * nz.smile
    xs = np.linspace(-1, 1, 15)
    line_y = cy - curve * xs**2 * 1.2
    lip = _mix(_mix(skin, (60, 60, 170), 0.35 + 0.3 * mouth["redness"]), (0, 0, 0), 0.15)
    up = mouth["upper"] * (1 - 0.6 * xs**2)
    cupid = mouth["cupid"] * 0.8 * np.exp(-((np.abs(xs) - 0.2) ** 2) / 0.02)
    upper = np.stack([xs * w, line_y - up - cupid], 1)
    lower = np.stack([xs * w, line_y + mouth["lower"] * (1 - xs**2)], 1)
    line = np.stack([xs * w, line_y], 1)
    _fill(img, p(np.vstack([upper, line[::-1]])), _mix(lip, (0, 0, 0), 0.1))
    _fill(img, p(np.vstack([line, lower[::-1]])), lip)
    _line(img, p(line), _mix(lip, (0, 0, 0), 0.55), 0.9 * p.k)
    return cy


def _draw_marks(
    img: np.ndarray, p: _Projector, face: dict, eyes: dict, marks: dict, skin: np.ndarray, mouth_y: float
) -> None:
    a, b = face["half_width"], face["half_height"]
    dark = _mix(skin, (0, 0, 0), 0.45)
    if marks["wrinkles"] > 0:
        for i in range(1 + int(marks["wrinkles"] * 2.5)):
            v = -b * (0.45 + 0.1 * i)
            xs = np.linspace(-0.45, 0.45, 9) * a
            pts = np.stack([xs, v + 0.8 * np.sin(xs / a * 6 + i)], 1)
            _blend(img, lambda L, pts=pts: _line(L, p(pts), dark, 0.6 * p.k), 0.25 + 0.3 * marks["wrinkles"])
    if marks["folds"] > 0.4:
        for s in (-1, 1):
            pts = np.array([[s * 5.5, eyes["height"] + 9], [s * 8.0, mouth_y - 1], [s * 9.5, mouth_y + 2.5]])
            _blend(img, lambda L, pts=pts: _line(L, p(pts), dark, 0.7 * p.k), 0.5 * marks["folds"])
    if marks["freckles"] > 0:
        rng = np.random.default_rng(marks["freckle_seed"])
        n = int(10 + 30 * marks["freckles"])
        pts = np.stack([rng.uniform(-0.7, 0.7, n) * a, rng.uniform(-0.05, 0.45, n) * b], 1)
        centres = p(pts)

        def dots(L: np.ndarray) -> None:
            for c in centres:
                cv2.circle(
                    L,
                    _fixed(c).tolist(),
                    int(0.5 * p.k * (1 << _SUBPIXEL)),
                    _bgr(dark),
                    -1,
                    cv2.LINE_AA,
                    _SUBPIXEL,
                )

        _blend(img, dots, 0.55)
    for u, v, r in marks["moles"]:
        _fill(img, p(_ellipse(u * a, v * b, r, r, n=12)), _mix(skin, (10, 10, 20), 0.7))
    if marks["dimple"] > 0:
        for s in (-1, 1):
            _blend(
                img,
                lambda L, s=s: _line(
                    L, p(_ellipse(s * a * 0.55, mouth_y - 1, 0.8, 1.8, n=10)[:6]), dark, 0.6 * p.k
                ),
                0.5,
            )


def _draw_extras(
    img: np.ndarray,
    p: _Projector,
    face: dict,
    eyes: dict,
    extras: dict,
    hair: np.ndarray,
    tip: float,
    mouth_y: float,
) -> None:
    a = face["half_width"]
    beard = extras["beard"]
    colour = _mix(hair, (0, 0, 0), 0.2)
    if beard in (1, 3):
        outline = _face_outline(face, grow=0.3)
        lower = outline[(outline[:, 1] > tip - 2)]
        lower = lower[np.argsort(np.arctan2(lower[:, 1], lower[:, 0]))]
        jaw = np.vstack([lower, [[-a * 0.55, tip + 1], [a * 0.55, tip + 1]]])
        alpha = 0.25 + 0.25 * extras["beard_density"] if beard == 1 else 0.7 + 0.3 * extras["beard_density"]
        _blend(img, lambda L: _fill(L, p(jaw, weight=0.5), colour), alpha)
    if beard in (2, 3):
        xs = np.linspace(-1, 1, 11)
        top = np.stack([xs * 8.0, tip + 1.2 + 0.8 * xs**2], 1)
        bottom = np.stack([xs * 9.5, mouth_y - 1.2 + 2.5 * xs**2], 1)[::-1]
        _blend(
            img, lambda L: _fill(L, p(np.vstack([top, bottom])), colour), 0.6 + 0.4 * extras["beard_density"]
        )
    if extras["glasses"]:
        frame = extras["frame"]
        r = eyes["rx"] * 1.45
        for s in (-1, 1):
            cx, cy = s * eyes["spacing"], eyes["height"] + 0.3
            if extras["glasses"] == 1:
                pts = _ellipse(cx, cy, r, r * 0.85, n=28)
            else:
                pts = np.array(
                    [
                        [cx - r, cy - r * 0.7],
                        [cx + r, cy - r * 0.7],
                        [cx + r, cy + r * 0.7],
                        [cx - r, cy + r * 0.7],
                    ]
                )
            _line(img, p(pts), frame, 1.0 * p.k, closed=True)
            _line(
                img,
                p(np.array([[s * (eyes["spacing"] + r), cy], [s * a * 1.02, cy - 1]]), weight=0.5),
                frame,
                0.9 * p.k,
            )
        bridge = np.array(
            [
                [-eyes["spacing"] + r, eyes["height"]],
                [0, eyes["height"] - 1],
                [eyes["spacing"] - r, eyes["height"]],
            ]
        )
        _line(img, p(bridge, depth=2.0), frame, 0.9 * p.k)


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
