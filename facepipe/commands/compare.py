"""`facepipe compare`: several uncertainty heads on one backbone and the quality baselines, one report.

    facepipe compare --models models:/facepipe-pfe@champion models:/facepipe-probface@champion ...
                     --shards DIR --out DIR [--reports DIR ...] [--far 1e-3] [--reject 0.2] [--no-mlflow]
                     [--config P] [k=v ...]

Writes OUT/comparison.html (static, figures embedded), OUT/comparison.md (one table per pair table),
OUT/comparison.json (the rows), OUT/<table>/edc_fmr_<α>.png and risk.png, and each model's full report
under OUT/models/<method>/<table>/. The files are logged as artefacts (folder ``comparison``) of an MLflow
run with the tag stage=compare, with each row's pAUC and accuracy as metrics.

With --reports (each model's `facepipe evaluate --model` folder), the features those evaluations saved
are used where they match the model, pair table and flip; the rest are embedded (through the embedding
cache of ``eval.embedding_cache`` when set).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from facepipe.commands import options
from facepipe.errors import DataError, FacepipeError

log = logging.getLogger("facepipe.compare")


HELP = "compare uncertainty heads on one backbone and quality baselines (EDC, risk, accuracy)"

DESCRIPTION = """\
Evaluate several registered models (uncertainty heads on the same backbone) on every pair table of
--shards, beside the feature-norm, random and (generated data) true-degradation baselines; write one
static HTML page, a markdown table and the figures, and log them to MLflow as a comparison run."""


def register(subparsers) -> None:
    parser = options.stage_parser(subparsers, "compare", HELP, DESCRIPTION)
    parser.add_argument(
        "--models", nargs="+", required=True, metavar="URI", help="model URIs or local bundle folders"
    )
    parser.add_argument("--shards", type=Path, required=True, help="decoded dataset with pairs/*.parquet")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--far", type=float, default=1e-3, help="FAR of the TAR@FAR column (default 1e-3)")
    parser.add_argument(
        "--reject", type=float, default=0.2, help="rejected fraction of the risk-controlled column (0.2)"
    )
    parser.add_argument(
        "--reports", nargs="+", type=Path, default=None, metavar="DIR",
        help="each model's `facepipe evaluate --model` report, in --models order: its saved features are "
        "used where they match (same weights, pair table and flip) instead of embedding again",
    )  # fmt: skip
    parser.add_argument("--no-mlflow", action="store_true", help="do not log a comparison run")
    options.finish(parser, run)


def run(args: argparse.Namespace) -> int:
    import tempfile

    from facepipe import tracking
    from facepipe.commands.evaluate import is_model_uri
    from facepipe.data.dataset import Dataset
    from facepipe.eval.compare import CompareSettings, compare_table, method_labels, table_features
    from facepipe.eval.embed_cache import EmbeddingCache
    from facepipe.eval.model_features import load_eval_model
    from facepipe.eval.report import write_metrics
    from facepipe.eval.verification import FAR_LEVELS
    from facepipe.progress import summary

    if not args.shards.is_dir():
        raise DataError("shards folder not found", path=args.shards)
    if not 0.0 <= args.reject < 1.0:
        raise FacepipeError(f"--reject must lie in [0, 1), got {args.reject}")
    if not any(f"{args.far:.0e}" == f"{level:.0e}" for level in FAR_LEVELS):  # before any embedding
        raise FacepipeError(
            f"--far must be one of {', '.join(f'{f:g}' for f in FAR_LEVELS)}, got {args.far:g}"
        )
    if args.reports is not None and len(args.reports) != len(args.models):
        counts = f"{len(args.models)} models, {len(args.reports)} folders"
        raise FacepipeError(f"--reports needs one folder per model, in --models order ({counts})")
    dataset = Dataset.at(args.shards)
    tables = dataset.pair_tables
    if not tables:
        raise DataError("no pair tables (pairs/*.parquet) to compare on", path=dataset.pairs_dir)
    config = options.load(args)
    settings = CompareSettings.from_config(config.eval, args.far, args.reject)
    with tempfile.TemporaryDirectory(prefix="facepipe-compare-") as tmp:
        models = []
        for i, source in enumerate(args.models):
            local = (
                tracking.download_model(source, config.tracking, Path(tmp) / str(i))
                if is_model_uri(source)
                else None
            )
            models.append(load_eval_model(local or source, source))
        labels = method_labels(models)
        cache = EmbeddingCache.at(config.eval.embedding_cache)  # for models whose features are not saved
        comparisons = []
        for path in tables.values():
            features = table_features(models, labels, Path(path), settings, args.reports, cache)
            comparisons.append(compare_table(models, labels, path, args.out, settings, features))
    paths = _write_report(comparisons, settings, args.out)
    paths.append(
        write_metrics(
            args.out, {c.name: {"n_pairs": c.n_pairs, "rows": c.rows} for c in comparisons}, "comparison.json"
        )
    )
    lines = {"pair table": f"{comparisons[0].name} (every table is in the report)"}
    lines |= {row["method"]: _headline(row, settings) for row in comparisons[0].rows}
    if not args.no_mlflow:
        lines["mlflow run"] = _log_run(config, args.shards, comparisons, paths, args.out)
    lines["report"] = str(args.out / "comparison.html")
    print(summary(f"facepipe compare: {len(models)} models on {len(comparisons)} pair tables", lines))
    return 0


def _write_report(comparisons, settings, out: Path) -> list[Path]:
    from facepipe.eval.compare_html import markdown, render_html, write_figures, write_text

    figures = {c.name: write_figures(c, out, settings) for c in comparisons}
    page = render_html(comparisons, figures, settings)
    paths = [
        write_text(out / "comparison.html", page),
        write_text(out / "comparison.md", markdown(comparisons, settings)),
    ]
    return paths + [p for ps in figures.values() for p in ps]


def _headline(row: dict, settings) -> str:
    """The row's pAUC at the first FMR target the pairs support, and its accuracy."""
    from facepipe.eval.edc_report import fmr_key

    paucs = [(a, row["pauc"].get(fmr_key(a))) for a in settings.edc.fmr_targets]
    alpha, pauc = next(((a, v) for a, v in paucs if v is not None), (None, None))
    text = f"pAUC@FMR={alpha:g} {pauc:.4f}" if pauc is not None else "no supported FMR target"
    if row.get("accuracy") is not None:
        text += f", accuracy {row['accuracy']:.4f}"
    return text


def _log_run(config, shards: Path, comparisons, paths: list[Path], out: Path) -> str:
    """A comparison run: the numbers as metrics, the report files as artefacts; returns its id."""
    from facepipe import tracking

    run_id = tracking.start_run(config, "compare", shards, "eval", run_name="compare")
    try:
        metrics = {}
        for comp in comparisons:
            for row in comp.rows:
                for key, value in row["pauc"].items():
                    if value is not None:  # None: an FMR target these pairs cannot support
                        metrics[_metric_name(comp.name, row["method"], f"pauc_{key}")] = value
                for key in ("accuracy", "tar_at_far", "risk_accuracy", "spearman_degradation"):
                    if row.get(key) is not None:
                        metrics[_metric_name(comp.name, row["method"], key)] = row[key]
        tracking.log_metrics(config.tracking, run_id, metrics)
        tracking.log_artifacts(config.tracking, run_id, paths, "comparison")
        models = [p for p in (out / "models").rglob("*") if p.is_file()]
        for p in models:
            tracking.log_artifacts(
                config.tracking, run_id, [p], f"comparison/{p.parent.relative_to(out).as_posix()}"
            )
    except Exception:
        tracking.end_run(config.tracking, run_id, "FAILED")
        raise
    tracking.end_run(config.tracking, run_id)
    return run_id


def _metric_name(*parts: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces only (a label may hold '#', '=')."""
    import re

    return ".".join(re.sub(r"[^\w\-./ ]", "_", p) for p in parts)
