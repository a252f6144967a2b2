"""The generated dataset's specification: which identity each index is (families of relatives among the
training identities; held-out identities for the pair sets). Its settings are `facepipe.config.SynthConfig`
(the `synth` section of params.yaml), with the fixed pair sets beside it there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# the settings are the configuration's `synth` section (one SynthConfig); the pair sets are fixed there
from facepipe.config import (  # noqa: F401 - re-exported for facepipe.data.synth.*
    CLEAN_MAX,
    DEGRADED_MIN,
    PAIR_SETS,
    SYNTH_HARD,
    SYNTH_VAL,
    PairSetSpec,
    SynthConfig,
)
from facepipe.data.synth import render as sr

GENERATOR_VERSION = 6

# Random streams: the first element after the seed in every default_rng([...]) key.
_S_TRAIN_ID, _S_TRAIN_IMG, _S_VAL_ID, _S_RELATIVE, _S_PAIR, _S_SAMPLES = range(6)

# Baselines the pairs must defeat (10-fold accuracy): learning has to be needed.
PIXEL_LIMIT = 0.70
HOG_LIMIT = 0.80


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
