"""The generated dataset's specification: its settings, the pair sets, and which identity each index is
(families of relatives among the training identities; held-out identities for the pair sets)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from facepipe.data.synth import render as sr

GENERATOR_VERSION = 6

# Random streams: the first element after the seed in every default_rng([...]) key.
_S_TRAIN_ID, _S_TRAIN_IMG, _S_VAL_ID, _S_RELATIVE, _S_PAIR, _S_SAMPLES = range(6)

# Degradation bands that describe pairs: "clean" < 0.3, "degraded" > 0.7 (as the training issue reads them).
CLEAN_MAX = 0.3
DEGRADED_MIN = 0.7
# Baselines the pairs must defeat (10-fold accuracy): learning has to be needed.
PIXEL_LIMIT = 0.70
HOG_LIMIT = 0.80


@dataclass(frozen=True)
class PairSetSpec:
    """One verification set: how hard its negatives are and how its pairs mix degradation levels.

    `mix` holds (weight, (lo_a, hi_a), (lo_b, hi_b)): the chance of a pair type and the uniform ranges its
    two images' degradation is drawn from.
    """

    name: str
    relative_groups: int  # parameter groups a hard negative re-draws
    hard_negative_fraction: float  # of the negative pairs
    mix: tuple[tuple[float, tuple[float, float], tuple[float, float]], ...]


SYNTH_VAL = PairSetSpec(
    "synth_val",
    relative_groups=5,
    # most negatives of a real verification protocol are strangers; synth_hard is the relatives test
    hard_negative_fraction=0.15,
    mix=(
        (0.40, (0.0, CLEAN_MAX), (0.0, CLEAN_MAX)),  # clean pairs
        (0.35, (0.0, CLEAN_MAX), (CLEAN_MAX, 1.0)),  # clean vs degraded
        (0.25, (CLEAN_MAX, 1.0), (CLEAN_MAX, 1.0)),  # both degraded
    ),
)
SYNTH_HARD = PairSetSpec(
    "synth_hard",
    relative_groups=2,
    hard_negative_fraction=0.7,
    mix=(
        (0.20, (0.0, CLEAN_MAX), (0.0, CLEAN_MAX)),
        (0.40, (0.0, CLEAN_MAX), (DEGRADED_MIN - 0.2, 1.0)),
        (0.40, (CLEAN_MAX, 1.0), (DEGRADED_MIN - 0.2, 1.0)),
    ),
)


@dataclass(frozen=True)
class SynthConfig:
    identities: int = 1000
    images_per_identity: int = 15
    pairs: int = 3000  # per verification set
    seed: int = 0
    size: int = 112
    # training identities that are relatives of the previous family: they teach fine differences
    relative_fraction: float = 0.75
    relative_groups: tuple[int, int] = (3, 5)  # groups re-drawn for a training relative (inclusive range)
    verification_identities: int = 0  # 0: pairs // 6
    pair_sets: tuple[PairSetSpec, ...] = field(default=(SYNTH_VAL, SYNTH_HARD))

    def __post_init__(self) -> None:
        if self.identities < 2:
            raise ValueError("need at least 2 identities")
        if self.images_per_identity < 1:
            raise ValueError("need at least 1 image per identity")
        if self.pairs < 20 or self.pairs % 2:
            raise ValueError("pairs must be an even number >= 20 (half positive, half negative)")
        if self.size < 32:
            raise ValueError("size must be at least 32 pixels")

    @property
    def num_verification_identities(self) -> int:
        return self.verification_identities or max(10, self.pairs // 6)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


# ----------------------------------------------------------------------------------- identities


def _is_relative(cfg: SynthConfig, index: int) -> bool:
    # the first draw of an identity's own stream decides whether it joins the previous family
    return index > 0 and _rng(cfg.seed, _S_TRAIN_ID, index).random() < cfg.relative_fraction


def training_identity(cfg: SynthConfig, index: int) -> sr.Identity:
    """Training identity `index` (its label). Families are runs of consecutive labels: a relative
    re-draws a few groups of its family's founder, the nearest earlier identity that is not a relative."""
    founder = index
    while _is_relative(cfg, founder):
        founder -= 1
    rng = _rng(cfg.seed, _S_TRAIN_ID, founder)
    rng.random()  # the family decision
    base = sr.sample_identity(rng)
    if founder == index:
        return base
    rng = _rng(cfg.seed, _S_TRAIN_ID, index)
    rng.random()
    lo, hi = cfg.relative_groups
    return sr.make_relative(base, rng, int(rng.integers(lo, hi + 1)), parent=founder)


def verification_identity(cfg: SynthConfig, index: int) -> sr.Identity:
    """Held-out identity: its own random stream, never a training label."""
    return sr.sample_identity(_rng(cfg.seed, _S_VAL_ID, index))


def verification_relative(cfg: SynthConfig, set_index: int, index: int) -> sr.Identity:
    spec = cfg.pair_sets[set_index]
    rng = _rng(cfg.seed, _S_RELATIVE, set_index, index)
    return sr.make_relative(verification_identity(cfg, index), rng, spec.relative_groups, parent=index)


@dataclass
class PairSet:
    name: str
    images: list[bytes]  # 2 per pair: a, b
    issame: list[bool]
    rows: list[dict[str, Any]]  # one per pair: degradation_a/b, identities, kind
