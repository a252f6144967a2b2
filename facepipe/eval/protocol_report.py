"""Reports of the template protocols: 1:N identification (closed and open set) and video set-to-set.

Each writes `metrics.json` and PNGs into its folder:
- identification: `cmc.png` (rank-k identification rate, k = 1..min(G, 50), log-k axis) and
  `det_identification.png` (FNIR vs FPIR over the threshold, both log), one curve per gallery (IJB-C: G1, G2);
- video: `roc.png` / `det.png` with one curve per fusion (mean of unit frames + each uncertainty method's
  own `fuse` and `pair_score` when per-frame uncertainty is present).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from facepipe.eval.identification import DEFAULT_FPIR, DEFAULT_RANKS, SearchResult, cmc, search, tpir_at_fpir
from facepipe.eval.plots import figure, save_png, set_labels
from facepipe.eval.report import log_curves, plot_det, plot_roc, write_metrics


def plot_cmc(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Identification rate (%) vs rank; ``curves[name] = (ranks, rate)``."""
    plt, fig, ax = figure()
    for name, (ranks, rate) in curves.items():
        ax.plot(ranks, 100 * np.asarray(rate), marker=".", lw=1.5, label=name)
    ax.set_xscale("log")
    set_labels(
        ax, "Rank (log scale)", "Identification rate of mated probes (%)", title or "CMC", "lower right"
    )
    return save_png(plt, fig, Path(path))


def plot_identification_det(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, title: str = ""
) -> Path:
    """FNIR vs FPIR on log-log axes; ``curves[name] = (fpir, fnir)`` (zeros are left off the log axes)."""
    plt, fig, ax = figure()
    log_curves(ax, curves, log_y=True, drawstyle="steps-post")
    x, y = "False positive identification rate (FPIR, log)", "False negative identification rate (FNIR, log)"
    set_labels(ax, x, y, title or "Open-set identification DET", "upper right")
    return save_png(plt, fig, Path(path))


def identification_det(result: SearchResult, rank: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(FPIR, FNIR) for every threshold at a non-mated top score: the DET of open-set identification."""
    nm = np.sort(result.top_score[~result.mated])[::-1]
    m_ok = result.rank[result.mated] <= rank
    m_score = np.sort(result.mate_score[result.mated][m_ok])
    n_mated = int(result.mated.sum())
    fpir = np.arange(nm.shape[0]) / max(nm.shape[0], 1)  # threshold nm[k]: k non-mated scores above it
    tpir = (m_score.shape[0] - np.searchsorted(m_score, nm, side="right")) / max(n_mated, 1)
    return fpir, 1.0 - tpir


def evaluate_identification(
    feats: np.ndarray,
    templates: np.ndarray,
    galleries: dict[str, tuple[np.ndarray, np.ndarray]],
    probes: tuple[np.ndarray, np.ndarray],
    out_dir: str | os.PathLike,
    name: str = "identification",
    ranks: tuple[int, ...] = DEFAULT_RANKS,
    fpir_levels: tuple[float, ...] = DEFAULT_FPIR,
    score_fn=None,
) -> tuple[dict, list[Path]]:
    """1:N search of the probe templates in each gallery (template ids -> rows of ``feats``).

    ``galleries[name] = (template ids, subject ids)``; ``probes = (template ids, subject ids)``. A probe
    whose subject is not in a gallery is a non-mated search there (open set); closed-set CMC uses the
    mated ones. Metrics per gallery and their mean over galleries.
    """
    from facepipe.eval.ijb import template_index

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p_rows = template_index(templates, probes[0], "probe templates")
    metrics: dict = {"name": name, "n_probe_templates": int(p_rows.shape[0]), "galleries": {}}
    cmc_curves, det_curves = {}, {}
    for g_name, (g_t, g_s) in galleries.items():
        g_rows = template_index(templates, g_t, f"gallery {g_name} templates")
        res = search(feats[p_rows], probes[1], feats[g_rows], g_s, score_fn)
        k_max = int(min(g_rows.shape[0], 50))
        all_ranks = tuple(range(1, k_max + 1))
        curve = cmc(res, all_ranks)
        entry = {
            "n_gallery_templates": int(g_rows.shape[0]),
            "n_mated_probes": int(res.mated.sum()),
            "n_nonmated_probes": int((~res.mated).sum()),
            "closed_set": {f"rank_{k}": v for k, v in cmc(res, ranks).items()},
        }
        cmc_curves[g_name] = (np.array(all_ranks), np.array([curve[k] for k in all_ranks]))
        if (~res.mated).any():
            entry["open_set"] = {f"{f:.0e}": v for f, v in tpir_at_fpir(res, fpir_levels).items()}
            fpir, fnir = identification_det(res)
            det_curves[g_name] = (fpir, fnir)
        metrics["galleries"][g_name] = entry
    metrics["closed_set"] = {
        k: float(np.mean([e["closed_set"][k] for e in metrics["galleries"].values()]))
        for k in next(iter(metrics["galleries"].values()))["closed_set"]
    }
    open_sets = [e["open_set"] for e in metrics["galleries"].values() if "open_set" in e]
    if open_sets:
        metrics["open_set"] = {k: float(np.mean([o[k]["tpir"] for o in open_sets])) for k in open_sets[0]}
    paths = [write_metrics(out, metrics), plot_cmc(cmc_curves, out / "cmc.png", f"{name}: CMC (closed set)")]
    if det_curves:
        det_path = out / "det_identification.png"
        paths.append(plot_identification_det(det_curves, det_path, f"{name}: FNIR vs FPIR (open set)"))
    return metrics, paths


def video_methods(uncertainty: np.ndarray | None, kind: str, embedding_size: int, method: str | None = None):
    """The registry methods whose own fusion applies to this stored uncertainty (kind and width)."""
    from facepipe.uncertainty.registry import METHODS, get_method

    if uncertainty is None:
        return []
    if method is not None:
        return [get_method(method)]
    cols = uncertainty.reshape(uncertainty.shape[0], -1).shape[1]
    return [
        m
        for m in METHODS.values()
        if m.uncertainty_kind == kind and m.uncertainty_size(embedding_size) == cols
    ]


def evaluate_video(
    embeddings: np.ndarray,
    frame_video: np.ndarray,
    video_a: np.ndarray,
    video_b: np.ndarray,
    issame: np.ndarray,
    out_dir: str | os.PathLike,
    name: str = "video",
    flipped: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    kind: str = "sigma_sq",
    method: str | None = None,
    n_folds: int = 10,
) -> tuple[dict, list[Path]]:
    """Set-to-set verification with the mean of unit frames and with each applicable method's fusion."""
    from facepipe.eval.scoring import numpy_callable
    from facepipe.eval.verification import l2_normalize
    from facepipe.eval.video import verify_videos

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    emb = embeddings if flipped is None else embeddings + flipped
    n_folds = max(2, min(n_folds, int(np.asarray(issame).shape[0])))
    base = verify_videos(emb, frame_video, video_a, video_b, issame, n_folds=n_folds)
    metrics: dict = {
        "name": name,
        "n_frames": int(emb.shape[0]),
        "n_videos": int(np.unique(frame_video).size),
        "fusions": {"mean": base.metrics()},
    }
    curves = {"mean of unit frames, cosine": (base.roc.fpr, base.roc.tpr)}
    for spec in video_methods(uncertainty, kind, emb.shape[1], method):
        u = spec.to_stored(np.asarray(uncertainty, np.float64).reshape(emb.shape[0], -1))  # stored -> own u
        res = verify_videos(
            l2_normalize(emb),
            frame_video,
            video_a,
            video_b,
            issame,
            u,
            numpy_callable(spec.fuse),
            numpy_callable(spec.pair_score),
            n_folds,
        )
        metrics["fusions"][spec.name] = res.metrics()
        curves[f"{spec.name} fusion + {spec.score_name}"] = (res.roc.fpr, res.roc.tpr)
    paths = [
        write_metrics(out, metrics),
        plot_roc(curves, out / "roc.png", f"{name}: video ROC"),
        plot_det(curves, out / "det.png", f"{name}: video DET"),
    ]
    return metrics, paths
