"""EDC section of the pair-table report: which qualities are compared, the metrics JSON part, the plots.

Every EDC of one report uses the same comparisons and the same comparator, the cosine of the flip-fused
embeddings, so the curves differ only in how the pairs are ranked (ISO/IEC 29794-1 judges a quality
measure against a fixed comparator). Per-image qualities, higher = better:

* the model's uncertainty, ``quality = −uncertainty_scalar(u)`` from the uncertainty-method registry
  (mean σ² for PFE, σ² for ProbFace, 1/κ for SCF);
* ``feature_norm``: ‖f(x)‖ of the un-normalised backbone embedding (the AdaFace / MagFace quality proxy);
* ``random``: a seeded uniform draw per image (one realisation of random discard);
* ``true_degradation``: −degradation, on generated data where the generator knows it (an oracle
  *quality*, not the ideal *curve*: the ideal curve discards the errors themselves).

A pair's quality is the lower of its two images'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facepipe.eval.edc import DEFAULT_DISCARD_LIMIT, DEFAULT_FMR_TARGETS, EDCResult, edc_report

RANDOM_SEED = 29794  # fixed (the standard's number): the same draw in every report, unlike seed 0 generators
BASELINES = ("feature_norm", "random", "true_degradation")
REFERENCE_LINES = ("ideal", "random_expected")


@dataclass(frozen=True)
class EdcSettings:
    """The ``eval.edc_*`` parameters."""

    fmr_targets: tuple[float, ...] = DEFAULT_FMR_TARGETS
    discard_limit: float = DEFAULT_DISCARD_LIMIT
    discard_max: float = 0.5
    population: str = "all"  # see facepipe.eval.edc.edc_report

    @classmethod
    def from_config(cls, ev) -> EdcSettings:
        """From a :class:`facepipe.config.EvalConfig`."""
        return cls(tuple(ev.edc_fmr_targets), ev.edc_discard_limit, ev.edc_discard_max, ev.edc_population)


def uncertainty_method(features):
    """The registry entry for the features' stored uncertainty (its ``method`` when known, else by kind)."""
    from facepipe.uncertainty import registry

    name = getattr(features, "method", None)
    if name:
        return registry.get_method(name)
    u = features.uncertainty.reshape(features.embeddings.shape[0], -1)
    return registry.method_for_stored(features.kind, u.shape[1], features.embeddings.shape[1])


def image_qualities(features) -> dict[str, np.ndarray]:
    """Per-image quality (higher = better) of every method and baseline the features allow."""
    import torch

    out: dict[str, np.ndarray] = {}
    n = features.embeddings.shape[0]
    if features.uncertainty is not None:
        spec = uncertainty_method(features)
        stored = np.asarray(features.uncertainty, dtype=np.float64).reshape(n, -1)
        native = spec.to_stored(stored)  # stored (σ² or 1/κ) → the head's u; the conversion is an involution
        scalar = spec.uncertainty_scalar(torch.from_numpy(np.ascontiguousarray(native)))
        out[spec.name] = -np.asarray(scalar, dtype=np.float64).reshape(-1)
    out["feature_norm"] = np.linalg.norm(np.asarray(features.embeddings, dtype=np.float64), axis=1)
    out["random"] = np.random.default_rng(RANDOM_SEED).random(n)
    if features.degradation is not None:
        d = np.asarray(features.degradation, dtype=np.float64).reshape(-1)
        if d.shape[0] == n and np.isfinite(d).all():
            out["true_degradation"] = -d
    return out


def edc_section(
    cos: np.ndarray, issame: np.ndarray, qualities: dict[str, np.ndarray], settings: EdcSettings
) -> tuple[dict, dict[str, dict[str, EDCResult]]]:
    """(the ``edc`` entry of metrics.json, the results keyed by FMR target then method)."""
    pair_q = {name: np.minimum(q[0::2], q[1::2]) for name, q in qualities.items()}
    results = edc_report(
        cos,
        issame,
        pair_q,
        settings.fmr_targets,
        settings.discard_limit,
        settings.discard_max,
        settings.population,
    )
    methods: dict[str, dict] = {}
    for key, per in results.items():
        for name, res in per.items():
            methods.setdefault(name, {})[key] = res.metrics()
    section = {
        "score": "cosine",
        "pair_quality": "min of the two images",
        "discard_limit": settings.discard_limit,
        "population": settings.population,
        "fmr_targets": list(settings.fmr_targets),
        "methods": methods,
    }
    return section, results


def plot_edc(
    per: dict[str, EDCResult],
    path: str | os.PathLike,
    title: str = "",
    discard_limit: float | None = None,
    population: str = "all",
) -> Path:
    """FNMR vs discarded fraction for every quality (steps), the ideal curve and the random line."""
    from facepipe.eval.plots import figure, save_png, set_labels

    plt, fig, ax = figure(9.6, 4.8)
    styles = {"ideal": dict(color="black", ls="--"), "random_expected": dict(color="grey", ls=":")}
    names = {"ideal": "ideal (errors discarded first)", "random_expected": "random discard (expected)"}
    for name, res in sorted(per.items(), key=lambda kv: kv[0] in REFERENCE_LINES):
        label = f"{names.get(name, name)}, pAUC={res.pauc:.4f}"
        style = styles.get(name, {})
        ax.plot(100 * res.discard, res.fnmr, drawstyle="steps-post", lw=1.6, label=label, **style)
    if discard_limit is not None:
        ax.axvline(100 * discard_limit, color="tab:red", lw=0.8, alpha=0.6)
    ax.set_ylim(bottom=0.0)
    some = next(iter(per.values()))
    which = "Mated comparisons" if population == "mated" else "Comparisons"
    xlabel = f"{which} discarded, lowest pair quality first (%)"
    ylabel = f"FNMR of kept comparisons (threshold at FMR={some.fmr_target:g})"
    default = f"EDC at FMR={some.fmr_target:g}"
    set_labels(ax, xlabel, ylabel, title or default, "upper right")
    # outside the axes: with many methods an inside legend hides the curves it names
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="pair quality")
    return save_png(plt, fig, Path(path))


def edc_plot_name(fmr_target: float) -> str:
    return f"edc_fmr_{fmr_target:g}.png"


def write_edc(
    cos: np.ndarray,
    issame: np.ndarray,
    features,
    out_dir: str | os.PathLike,
    name: str,
    settings: EdcSettings | None = None,
) -> tuple[dict, list[Path]]:
    """The EDC part of a pair-table report: (metrics ``edc`` entry, one PNG per FMR target)."""
    settings = settings or EdcSettings()
    section, results = edc_section(cos, issame, image_qualities(features), settings)
    paths = [
        plot_edc(
            per,
            Path(out_dir) / edc_plot_name(per["ideal"].fmr_target),
            f"{name}: EDC at FMR={per['ideal'].fmr_target:g} (cosine comparator)",
            settings.discard_limit,
            settings.population,
        )
        for per in results.values()
    ]
    return section, paths
