"""`facepipe evaluate`: verification / risk / IJB-style metrics and plots from a features file.

    facepipe evaluate --features FEATS.npz [--pairs PAIRS.parquet] [--uncertainty KIND] --out DIR
    facepipe evaluate --templates IJB.npz [--protocols 1:1,1:N] [--ranks 1,5,10] [--fpir ...] --out DIR
    facepipe evaluate --video VIDEO.npz [--fusion METHOD] --out DIR
    facepipe evaluate --model URI --protocol DIR --out DIR   (a folder of facepipe.data.protocols / synth)
    facepipe evaluate --model models:/facepipe-probface@champion --shards DIR --out DIR [--config P] [k=v ...]

With `--model` (a registered model URI or a local bundle folder), every pair table DIR/pairs/*.parquet is
embedded (f(x) and f(flip x); σ² or 1/κ when the model has an uncertainty head) and reported:
OUT/metrics.json (a summary keyed by pair-table name), OUT/<table>/metrics.json (everything),
OUT/plots/<table>/*.png, and OUT/model.json (what was evaluated).

The features format is documented in :mod:`facepipe.eval.features`; an IJB-style templates NPZ holds
``embeddings`` (N, D), optional ``flipped`` and ``faceness``, ``templates`` and ``medias`` (N,), the
pair list ``p1``, ``p2``, ``label`` and, for ``--fusion pfe|probface|scf``, ``uncertainty`` (N,) or
(N, D): σ² for PFE/ProbFace, 1/κ for SCF. With gallery/probe lists it also runs 1:N identification
(closed-set CMC, open-set TPIR@FPIR; :mod:`facepipe.commands.evaluate_protocols`); a video NPZ runs
set-to-set verification with the mean of frames and each uncertainty method's own fusion.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from facepipe.commands.choices import KindChoices, MethodChoices
from facepipe.commands.options import add_config_option, config_flag, load
from facepipe.errors import DataError, FacepipeError

log = logging.getLogger("facepipe.evaluate")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="verification, risk-controlled and IJB-style metrics + plots from precomputed features",
        description=(
            "Score a features file against its pair table with the InsightFace 10-fold protocol, TAR@FAR, "
            "the uncertainty-aware score and risk-controlled accuracy (when the file has uncertainty), or "
            "an IJB-style templates file; writes DIR/metrics.json and PNG plots (ROC, DET, accuracy vs "
            "rejection, uncertainty histograms by degradation level)."
        ),
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", type=Path, help="per-image features (.npz or .parquet), pair order")
    src.add_argument("--templates", type=Path, help="IJB-style templates .npz (images, templates, pairs)")
    src.add_argument("--video", type=Path, help="video .npz (frame features, video ids, video pairs)")
    src.add_argument(
        "--model",
        help="model URI (models:/facepipe-probface@champion, runs:/...) or a local bundle folder",
    )
    parser.add_argument(
        "--shards",
        type=_shards_location,
        help="decoded dataset (folder or URI: s3://bucket/shards) whose pairs/*.parquet --model scores",
    )
    parser.add_argument(
        "--protocol",
        type=Path,
        action="append",
        help="protocol folder (IJB or video tables) --model is scored on; repeatable, and beside --shards "
        "or another --protocol each report goes to OUT/<folder name>",
    )
    config_flag(
        parser,
        "--embedding-cache",
        key="eval.embedding_cache",
        help="keep the backbone's outputs in this local folder, reused by every model on the same backbone",
    )
    parser.add_argument(
        "--protocols",
        default=None,
        help="which of 1:1,1:N a templates input runs (default: everything the data holds)",
    )
    parser.add_argument("--ranks", default=None, help="closed-set ranks reported (default 1,5,10)")
    parser.add_argument("--fpir", default=None, help="open-set FPIR levels (default 0.001,0.01,0.1)")
    add_config_option(parser, "parameters file for --model (default: ./params.yaml if present)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="configuration overrides (with --model)"
    )
    parser.add_argument("--pairs", type=Path, help="pair table (.parquet with issame, fold)")
    parser.add_argument(
        "--uncertainty",
        choices=KindChoices("auto", "none"),
        default="auto",
        help="what the file's 'uncertainty' holds (auto: the file's 'kind', else sigma_sq; none: ignore it)",
    )
    parser.add_argument(
        "--rejection",
        default=None,
        help="rejection rates, comma-separated (e.g. 0,0.1,0.2,0.3) [sets eval.rejection_rates]",
    )
    parser.add_argument(
        "--fusion",
        choices=MethodChoices("insightface"),
        default="insightface",
        help="template fusion for --templates (an uncertainty method needs 'uncertainty' in the file)",
    )
    config_flag(parser, "--folds", key="eval.folds", help="k of the k-fold protocol")
    parser.add_argument("--name", default=None, help="name shown in plots (default: the pair table's stem)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.set_defaults(func=run)


def _rates(text: str | None) -> tuple[float, ...]:
    if text is None:
        return (0.0, 0.1, 0.2, 0.3)
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise FacepipeError(f"--rejection must be comma-separated numbers: {text!r}") from err
    if not rates or any(not 0.0 <= r < 1.0 for r in rates):
        raise FacepipeError(f"--rejection rates must lie in [0, 1): {text!r}")
    return rates


def run(args: argparse.Namespace) -> int:
    from facepipe.progress import summary

    if args.model is not None:
        return _run_model(args)
    from facepipe.commands.evaluate_protocols import file_label, run_templates, run_video

    if args.video is not None:
        metrics, paths = run_video(args, args.video)
        head = {
            f"{name} fusion": f"acc {m['accuracy']:.4f} ± {m['std']:.4f}, AUC {m['auc']:.4f}"
            for name, m in metrics["fusions"].items()
        }
    elif args.features is not None:
        metrics, paths = _run_pairs(args)
        head = {
            "accuracy": f"{metrics['insightface']['accuracy']:.5f} ± {metrics['insightface']['std']:.5f}",
            "VAL@FAR=1e-3": f"{metrics['insightface']['val']:.5f}",
        }
    else:
        metrics, paths = run_templates(args)
        head = {f"TAR@FAR={k}": f"{v:.4f}" for k, v in metrics.get("tar_at_far_nearest", {}).items()}
        if "identification" in metrics:
            ident = metrics["identification"]
            head |= {f"1:N {k}": f"{v:.4f}" for k, v in ident["closed_set"].items()}
            head |= {f"TPIR@FPIR={k}": f"{v:.4f}" for k, v in ident.get("open_set", {}).items()}
    lines = head | {file_label(p, args.out): str(p) for p in paths}
    print(summary(f"facepipe evaluate: wrote {len(paths)} files to {args.out}", lines))
    return 0


def _run_pairs(args: argparse.Namespace):
    from facepipe.eval.features import load_pair_features
    from facepipe.eval.pairs import table_report

    if args.pairs is not None and not args.pairs.is_file():
        raise DataError("pair table not found", path=args.pairs)
    if args.features.is_file() and args.features.suffix != ".parquet":
        from facepipe.npz import check_npz

        check_npz(args.features, "features")  # a truncated or non-zip .npz: one error naming the file
    features = load_pair_features(args.features, args.pairs)
    if args.uncertainty == "none":
        features.uncertainty = None
    elif args.uncertainty != "auto":
        features.kind = args.uncertainty
    name = args.name or (args.pairs.stem if args.pairs else args.features.stem)
    log.info("evaluating %d pairs of %s", features.n_pairs, name)
    from facepipe.eval.edc_report import EdcSettings

    ev = _eval_config(args)
    try:
        metrics, _, paths = table_report(
            features, args.out, name, tuple(ev.rejection_rates), ev.folds, EdcSettings.from_config(ev)
        )
        return metrics, paths
    except ValueError as err:
        raise FacepipeError(f"{args.features}: {err}") from err


def _eval_config(args: argparse.Namespace):
    """The `eval` section of this run (--config, overrides, --folds), with --rejection applied: the
    same settings the training stages evaluate with."""
    ev = load(args).eval
    if args.rejection is not None:
        ev.rejection_rates = list(_rates(args.rejection))
    return ev


def _shards_location(text: str) -> Path | str:
    """--shards: a local folder (Path) or an object-storage URI (kept as text)."""
    from facepipe.storage import is_remote

    return text if is_remote(text) else Path(text)


def fetch_pair_tables(location: str, tmp: str) -> Path:
    """The pair tables and manifest of a dataset at a URI, copied into `tmp` (evaluation reads them whole)."""
    from facepipe.data.shards import fetch_pair_tables as fetch

    try:
        return fetch(location, Path(tmp) / "shards")
    except OSError as err:
        raise DataError(f"cannot read the dataset: {err}", path=location) from None


def is_model_uri(source: str) -> bool:
    """A registered model / run URI (`models:/NAME@ALIAS`, `runs:/...`) rather than a local folder."""
    return "://" in source or source.startswith(("models:/", "runs:/"))


def _run_model(args: argparse.Namespace) -> int:
    """`--model`: one model load scores the pair tables of --shards and each --protocol folder."""
    import tempfile

    from facepipe import tracking
    from facepipe.commands.evaluate_protocols import protocol_report
    from facepipe.eval.embed_cache import EmbeddingCache
    from facepipe.eval.model_features import load_eval_model

    protocols = _protocol_outs(args)
    if args.shards is None and not protocols:
        raise FacepipeError(
            "--model needs --shards DIR (a decoded dataset with pairs/*.parquet) or --protocol DIR"
        )
    if isinstance(args.shards, Path) and not args.shards.is_dir():
        raise DataError("shards folder not found", path=args.shards)
    config = load(args)
    config.eval = _eval_config(args)
    cache = EmbeddingCache.at(config.eval.embedding_cache)
    with tempfile.TemporaryDirectory(prefix="facepipe-eval-") as tmp:
        # the command resolves a model URI into a local folder, so evaluation never talks to MLflow
        local = (
            tracking.download_model(args.model, config.tracking, tmp) if is_model_uri(args.model) else None
        )
        model = load_eval_model(local or args.model, args.model)
        if args.shards is not None:
            shards = args.shards if isinstance(args.shards, Path) else fetch_pair_tables(args.shards, tmp)
            _pair_tables_report(args, model, shards, config.eval, cache)
        for folder, out in protocols.items():
            protocol_report(args, model, folder, out, config.eval, cache)
    return 0


def _protocol_outs(args: argparse.Namespace) -> dict[Path, Path]:
    """Each --protocol folder and its report folder: OUT for a lone one, else OUT/<folder name>."""
    folders = list(args.protocol or [])
    for folder in folders:
        if not folder.is_dir():
            raise DataError("protocol folder not found", path=folder)
    if len(folders) == 1 and args.shards is None:
        return {folders[0]: args.out}
    names = [f.name for f in folders]
    if len(set(names)) < len(names):
        raise FacepipeError(f"--protocol folders need distinct names (reports go to OUT/<name>): {names}")
    return {f: args.out / f.name for f in folders}


def _pair_tables_report(args: argparse.Namespace, model, shards: Path, ev, cache) -> None:
    """Embed every pair table of `shards` and write the report into --out; print its summary."""
    import time

    from facepipe.eval import metrics as M
    from facepipe.eval.model_features import evaluate_model
    from facepipe.eval.pairs import eval_options, score_names
    from facepipe.progress import summary

    start = time.monotonic()
    # the settings the training stages evaluate with
    tables, paths = evaluate_model(model, shards, args.out, **{**eval_options(ev), "cache": cache})
    lines = {"model": args.model + (f" ({model.method} head)" if model.method else " (backbone)")}
    for name, m in tables.items():
        text = f"acc {m[M.ACCURACY]:.4f} ± {m[M.STD]:.4f}"
        for key in [M.score_accuracy(score) for score in score_names()] + [M.band_accuracy("clean")]:
            if key in m:
                text += f", {key.removesuffix('_accuracy')} {m[key]:.4f}"
        if M.SPEARMAN_DEGRADATION in m:
            text += f", spearman(u, degradation) {m[M.SPEARMAN_DEGRADATION]:.3f}"
        if M.EDC_PAUC in m:
            text += f", EDC pAUC@FMR={m[M.EDC_FMR]:g} {m[M.EDC_PAUC]:.4f} (lower is better)"
        lines[name] = text
    lines["report"] = str(args.out / "metrics.json")
    lines["files"] = f"{len(paths)} ({time.monotonic() - start:.1f} s)"
    print(summary(f"facepipe evaluate: {args.model} on {len(tables)} pair tables", lines))
