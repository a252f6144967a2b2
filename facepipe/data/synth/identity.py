"""Generated faces, part 1: identity parameters (and relatives) and per-image nuisance, sampled from a
numpy Generator. `render` draws them."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

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
