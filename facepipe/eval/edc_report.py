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

**Supported FMR targets.** The threshold at FMR α lets ``k = ⌊α·n_I⌋`` impostor comparisons through
(see :mod:`facepipe.eval.edc`). With fewer than ``1/α`` impostor comparisons ``k = 0``: τ is the top
impostor score whatever α is, so the "curve at α" is the curve at FMR 0 of this pair set, the same for
every target that small. Such a target is *unsupported*: metrics.json marks it (``unsupported``: the
reason; per method ``supported: false`` and ``pauc: null``, no curve) and its PNG says so in the title
instead of drawing curves.
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


def fmr_key(fmr_target: float) -> str:
    """The key of one FMR target in the ``edc`` entry and in the results (``"fmr=0.001"``)."""
    return f"fmr={fmr_target:g}"


def unsupported_reason(n_impostor: int, fmr_target: float) -> str | None:
    """Why ``n_impostor`` comparisons cannot fix a threshold at FMR ``fmr_target`` (None: they can).

    The rule of :func:`facepipe.eval.edc.threshold_at_fmr`: it needs ``⌊α·n_I⌋ ≥ 1``, i.e. at least
    ``1/α`` impostor comparisons; below that the threshold is the top impostor score for any α.
    """
    if int(np.floor(fmr_target * n_impostor)) >= 1:
        return None
    return (
        f"unsupported: {n_impostor} impostor comparisons < 1/FMR = {1.0 / fmr_target:g} "
        "(the threshold would sit at the top impostor score)"
    )


def edc_section(
    cos: np.ndarray, issame: np.ndarray, qualities: dict[str, np.ndarray], settings: EdcSettings
) -> tuple[dict, dict[str, dict[str, EDCResult]]]:
    """(the ``edc`` entry of metrics.json, the results keyed by FMR target then method).

    Only supported FMR targets have results (curves); the entry lists the others under
    ``unsupported`` with the reason, and each method's entry for them is ``supported: false``,
    ``pauc: null``.
    """
    n_impostor = int((~np.asarray(issame, dtype=bool)).sum())
    unsupported = {
        fmr_key(a): why for a in settings.fmr_targets if (why := unsupported_reason(n_impostor, a))
    }
    pair_q = {name: np.minimum(q[0::2], q[1::2]) for name, q in qualities.items()}
    supported = [a for a in settings.fmr_targets if fmr_key(a) not in unsupported]
    results = edc_report(
        cos,
        issame,
        pair_q,
        supported,
        settings.discard_limit,
        settings.discard_max,
        settings.population,
    )
    names = [*qualities, *REFERENCE_LINES]
    methods: dict[str, dict] = {name: {} for name in names}
    for alpha in settings.fmr_targets:
        key = fmr_key(alpha)
        for name in names:
            if key in unsupported:
                methods[name][key] = {"fmr_target": alpha, "supported": False, "pauc": None}
            else:
                methods[name][key] = {**results[key][name].metrics(), "supported": True}
    section = {
        "score": "cosine",
        "pair_quality": "min of the two images",
        "discard_limit": settings.discard_limit,
        "population": settings.population,
        "fmr_targets": list(settings.fmr_targets),
        "n_impostor": n_impostor,
        "unsupported": unsupported,
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


def plot_unsupported(path: str | os.PathLike, title: str, reason: str) -> Path:
    """The PNG of an unsupported FMR target: no curves, the title and the reason say why."""
    from facepipe.eval.plots import figure, save_png

    plt, fig, ax = figure(9.6, 4.8)
    ax.set_axis_off()
    ax.text(0.5, 0.5, reason.replace(" (", "\n("), ha="center", va="center", wrap=True)
    ax.set_title(title)
    return save_png(plt, fig, Path(path))


def edc_plot_name(fmr_target: float) -> str:
    return f"edc_fmr_{fmr_target:g}.png"


def plot_edc_targets(
    section: dict,
    results: dict[str, dict[str, EDCResult]],
    out_dir: str | os.PathLike,
    label: str,
    settings: EdcSettings,
    detail: str = " (cosine comparator)",
) -> list[Path]:
    """One PNG per FMR target of an :func:`edc_section`: the curves, or the unsupported notice.

    Titles read ``"<label>: EDC at FMR=<α><detail>"``, or ``"<label>: EDC at FMR=<α> unsupported"``.
    """
    paths = []
    for alpha in settings.fmr_targets:
        key, path = fmr_key(alpha), Path(out_dir) / edc_plot_name(alpha)
        head = f"{label}: EDC at FMR={alpha:g}"
        if key in results:
            plot = plot_edc(results[key], path, head + detail, settings.discard_limit, settings.population)
            paths.append(plot)
        else:
            paths.append(plot_unsupported(path, f"{head} unsupported", section["unsupported"][key]))
    return paths


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
    return section, plot_edc_targets(section, results, out_dir, name, settings)
