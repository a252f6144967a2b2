"""Every metric key facepipe reports, defined once: its name, what it means, and which way is better.

One pair table's headline (``OUT/metrics.json`` of ``facepipe evaluate --model``, section ``<table>``; the
``summary`` entry of ``facepipe evaluate --features``) uses these keys. A training stage logs the same
headline as ``val/<table>/<key>`` and, at the top level, each key's mean over the pair tables
(:func:`stage_metrics`): the numbers of a training run and of ``facepipe evaluate`` on the same model and
data are the same numbers under the same names. Producers and consumers (the report, the head stage, the
registry's ``champion`` decision, the benchmark flow's scoring, the comparison report) take the keys from
here, and :func:`metric` answers what a key means and whether higher or lower is better.

The ``champion`` alias is decided by one named metric per kind of model (``tracking.champion_metric``
for backbones, ``tracking.head_champion_metric`` for uncertainty heads):

* backbones: :data:`ACCURACY`, the InsightFace 10-fold verification accuracy (higher is better);
* uncertainty heads: :data:`EDC_PAUC`, the ISO/IEC 29794-1 EDC partial area of the head's own
  uncertainty (lower is better). Heads share a frozen backbone, so their cosine accuracy is the same
  number for every head and cannot rank them; what a head adds is *which* comparisons it flags as
  unreliable. The EDC pAUC measures exactly that with the comparator and threshold fixed (the standard's
  way to judge a quality measure): FNMR of the kept comparisons, integrated while the lowest-quality
  comparisons are discarded up to ``eval.edc_discard_limit``. It uses every rejection level up to the
  limit instead of one (risk-controlled accuracy at one rate), keeps the operating threshold fixed instead
  of re-fitting it on the kept pairs, and is exact (no grid).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    """A reported number: its key, a one-line meaning, and its direction."""

    key: str
    meaning: str
    higher_is_better: bool

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"


# --- degradation bands of generated data (per image, 0 = clean .. 1 = heavily degraded) ---------------
CLEAN_MAX = 0.3  # a "clean" image / pair: degradation below this (both images, for a pair)
HEAVY_MIN = 0.7  # a "heavily degraded" image / pair: degradation above this (either image)
BANDS = ("clean", "degraded", "heavily_degraded")

FIXED: dict[str, Metric] = {}  # every key with a fixed name (templated keys: PATTERNS below)
HIGHER, LOWER = True, False


def _define(key: str, meaning: str, higher_is_better: bool) -> str:
    FIXED[key] = Metric(key, meaning, higher_is_better)
    return key


# --- one pair table's headline keys --------------------------------------------------------------------
N_PAIRS = _define("n_pairs", "number of pairs in the table", HIGHER)
ACCURACY = _define("accuracy", "InsightFace 10-fold verification accuracy of the flip-fused cosine", HIGHER)
STD = _define("std", "standard deviation of that accuracy over the folds", LOWER)
VAL_AT_FAR = _define("val_at_far_1e-3", "InsightFace VAL (true accept rate) at FAR=1e-3, 10-fold", HIGHER)
AUC = _define("auc", "area under the ROC of the cosine over all pairs", HIGHER)
EDC_PAUC = _define(
    "edc_pauc",
    "ISO/IEC 29794-1 EDC pAUC of the model's own uncertainty (cosine comparator, threshold at the first "
    "FMR of eval.edc_fmr_targets the pairs support, discarding up to eval.edc_discard_limit)",
    LOWER,
)
EDC_FMR = _define("edc_fmr", "the FMR target the edc_pauc threshold was set at", LOWER)
SPEARMAN_DEGRADATION = _define(
    "spearman_uncertainty_degradation",
    "Spearman correlation of per-image uncertainty and degradation",
    HIGHER,
)
COSINE = "cosine"  # the score label of the plain cosine comparator (risk keys, report sections)

# --- the columns of a comparison row (facepipe.eval.compare: one row per method on one pair table) ------
# `accuracy` there is the row's own score's 10-fold accuracy (the head's uncertainty-aware score, the
# cosine for a baseline)
TAR_AT_FAR = _define("tar_at_far", "true accept rate of the row's score at the comparison's FAR", HIGHER)
RISK_AT_REJECT = _define(
    "risk_accuracy", "the row's score's accuracy, the --reject fraction rejected", HIGHER
)
SPEARMAN_QUALITY = _define("spearman_degradation", "Spearman of (-quality, degradation) per image", HIGHER)
PAUC = _define("pauc", "EDC pAUC per FMR target of the row's quality (cosine comparator)", LOWER)

NOT_AVERAGED = (N_PAIRS, EDC_FMR)  # counts and settings: per table only, no mean at a run's top level

BACKBONE_CHAMPION_METRIC = ACCURACY
HEAD_CHAMPION_METRIC = EDC_PAUC


def _pct(rate: float) -> int:
    return int(round(rate * 100))


def score_accuracy(score: str) -> str:
    """10-fold accuracy of an uncertainty-aware score (``mls_probface_accuracy``, ``scf_accuracy`` ...)."""
    return f"{score}_accuracy"


def risk_accuracy(score: str, rate: float) -> str:
    """Risk-controlled accuracy: ``score``'s 10-fold accuracy after rejecting the ``rate`` most uncertain
    pairs (``risk_cosine_reject_20``)."""
    return f"risk_{score}_reject_{_pct(rate)}"


def legacy_risk_accuracy(rate: float) -> str:
    """The training runs' older name of ``risk_cosine_reject_<pct>``, still logged beside it (plots and
    dashboards of earlier runs read it)."""
    return f"risk_acc_reject_{_pct(rate)}"


def band_accuracy(band: str) -> str:
    return f"{band}_accuracy"


def band_std(band: str) -> str:
    return f"{band}_std"


def band_count(band: str) -> str:
    return f"n_{band}_pairs"


def table_key(table: str, key: str) -> str:
    """A pair table's metric in a training run: ``val/<table>/<key>``."""
    return f"val/{table}/{key}"


_BAND = "|".join(BANDS)
PATTERNS: tuple[tuple[re.Pattern[str], str, bool], ...] = (
    (
        re.compile(r"risk_acc_reject_(\d+)"),
        "cosine accuracy after rejecting the {0}% most uncertain pairs",
        True,
    ),
    (
        re.compile(r"risk_(\w+?)_reject_(\d+)"),
        "{0}'s accuracy after rejecting the {1}% most uncertain pairs",
        True,
    ),
    (re.compile(rf"n_({_BAND})_pairs"), "number of {0} pairs", True),
    (re.compile(rf"({_BAND})_accuracy"), "10-fold cosine accuracy on the {0} pairs", True),
    (re.compile(rf"({_BAND})_std"), "fold standard deviation of the {0} pairs' accuracy", False),
    (re.compile(r"(\w+)_accuracy"), "10-fold accuracy of the uncertainty-aware score {0}", True),
)


def metric(key: str) -> Metric:
    """What ``key`` (also ``val/<table>/<key>``) means and which way is better; ValueError if unknown."""
    bare = key.rsplit("/", 1)[-1]
    if bare in FIXED:
        return FIXED[bare]
    for pattern, meaning, higher in PATTERNS:
        found = pattern.fullmatch(bare)
        if found:
            return Metric(bare, meaning.format(*found.groups()), higher)
    raise ValueError(
        f"unknown metric {key!r}; known: {sorted(FIXED)} and the patterns of facepipe.eval.metrics"
    )


def is_better(key: str, candidate: float | None, incumbent: float | None) -> bool:
    """Whether ``candidate`` strictly beats ``incumbent`` on ``key`` (a missing or NaN value never wins;
    anything beats a missing incumbent)."""
    if candidate is None or not math.isfinite(candidate):
        return False
    if incumbent is None or not math.isfinite(incumbent):
        return True
    return candidate > incumbent if metric(key).higher_is_better else candidate < incumbent


def best_of(key: str, values: Mapping[str, float | None]) -> list[str]:
    """The names whose value is best on ``key`` (ties: all of them, in the mapping's order)."""
    scored = {n: v for n, v in values.items() if v is not None and math.isfinite(v)}
    if not scored:
        return []
    pick = max if metric(key).higher_is_better else min
    top = pick(scored.values())
    return [n for n, v in scored.items() if v == top]


def mean_over_tables(tables: Iterable[Mapping[str, Any]], key: str) -> float | None:
    """``key`` averaged over the pair tables that report it as a finite number; None when none does."""
    values = [
        float(t[key])
        for t in tables
        if isinstance(t, Mapping) and isinstance(t.get(key), int | float) and not isinstance(t.get(key), bool)
    ]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def stage_metrics(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """A pair-table report (table → headline) as a training run logs it: ``val/<table>/<key>`` for every
    number, each key's mean over the tables at the top level, and the legacy risk names beside theirs."""
    out: dict[str, float] = {}
    keys: dict[str, None] = {}
    for table, headline in summary.items():
        for key, value in headline.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[table_key(table, key)] = float(value)
                keys[key] = None
                legacy = re.fullmatch(rf"risk_{COSINE}_reject_(\d+)", key)
                if legacy:
                    out[table_key(table, legacy_risk_accuracy(int(legacy.group(1)) / 100))] = float(value)
    for key in keys:
        if key in NOT_AVERAGED or key.startswith("n_"):
            continue
        mean = mean_over_tables(summary.values(), key)
        if mean is not None:
            out[key] = mean
    return out
