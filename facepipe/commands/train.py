"""`facepipe train backbone|uncertainty|finetune`: the training stages on Ray Train.

    facepipe train backbone [--config params.yaml] [--shards DIR] [--name RUN] [--metrics-out FILE] [k=v ...]
    facepipe train uncertainty --method METHOD --backbone models:/facepipe-backbone@champion
    facepipe train finetune --backbone models:/facepipe-backbone@champion

Re-running with the same `--name` resumes that run from its latest checkpoint. `--address` attaches to
a Ray cluster (same as `train_*.scaling.address=...`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from facepipe.commands.choices import MethodChoices
from facepipe.console import framework_output_to
from facepipe.orchestration.stage_cache import LOG_DIR


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the backbone, an uncertainty head, or fine-tune (Ray Train, MLflow)",
        description="Train a stage on Ray Train; metrics and the model go to MLflow.",
    )
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, text in (
        ("backbone", "backbone + margin head (DDP, checkpoints, resume)"),
        ("uncertainty", "an uncertainty head (a registered method) on a frozen backbone"),
        ("finetune", "triplet fine-tuning with the centre term (video model)"),
    ):
        sub = stages.add_parser(stage, help=text, description=text)
        sub.add_argument("--config", default=None, help="parameters file (default: ./params.yaml)")
        sub.add_argument("--shards", default=None, help="decoded dataset (default: paths.shards)")
        sub.add_argument("--name", default=None, help="run name; an existing run of that name is resumed")
        sub.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
        sub.add_argument("--no-register", action="store_true", help="log to MLflow but do not register")
        sub.add_argument(
            "--events",
            default=None,
            metavar="FILE",
            help="append worker events (start with pid/node, step, checkpoint) as JSON lines",
        )
        if stage != "backbone":
            sub.add_argument(
                "--backbone",
                default=None,
                help="model URI (models:/NAME@ALIAS) or a bundle/checkpoint folder",
            )
        if stage == "uncertainty":
            sub.add_argument("--method", choices=MethodChoices(), default=None)
            sub.add_argument(
                "--no-cache",
                action="store_true",
                help="recompute backbone features every batch instead of caching them",
            )
        sub.add_argument(
            "--metrics-out",
            default=None,
            metavar="FILE",
            help="also write the final metrics as JSON to FILE (atomically; for `dvc metrics`)",
        )
        sub.add_argument("overrides", nargs="*", metavar="section.key=value", help="configuration overrides")
        sub.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from facepipe.config import load_config

    config = load_config(args.config, args.overrides)
    section = {
        "backbone": config.train_backbone,
        "uncertainty": config.train_uncertainty,
        "finetune": config.finetune,
    }[args.stage]
    if args.address:
        section.scaling.address = args.address
    with framework_output_to(None if args.verbose else _log_path(config, args.stage)) as logged:
        result = _run_stage(args, config)
    if logged is not None:
        print(f"  full log    {logged}")
    if args.metrics_out:
        write_metrics_file(args.metrics_out, result)
    return 0


def _log_path(config: Any, stage: str) -> Path:
    """Where Ray's per-rank output and library logs go (the console keeps facepipe's lines; -v: all):
    `<paths.runs>/logs/` when the runs are on this machine, else `.facepipe/logs/` here."""
    runs = str(config.paths.runs)
    folder = Path(runs) / "logs" if "://" not in runs else Path(LOG_DIR)
    return folder / f"train-{stage}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def _run_stage(args: argparse.Namespace, config: Any) -> Any:
    register = not args.no_register
    if args.stage == "backbone":
        from facepipe.train.backbone import train_backbone

        result = train_backbone(
            config, args.shards, run_name=args.name, register=register, events_path=args.events
        )
    elif args.stage == "uncertainty":
        from facepipe.train.head import train_uncertainty

        if args.no_cache:
            config.train_uncertainty.cache_features = False
        result = train_uncertainty(
            config,
            args.shards,
            method=args.method,
            backbone_uri=args.backbone,
            run_name=args.name,
            register=register,
            events_path=args.events,
        )
    else:
        from facepipe.train.finetune import finetune

        result = finetune(
            config,
            args.shards,
            backbone_uri=args.backbone,
            run_name=args.name,
            register=register,
            events_path=args.events,
        )
    return result


def write_metrics_file(path: str, result) -> None:
    """The stage's final numeric metrics (and the registered version, if any) as JSON, atomically."""
    from pathlib import Path

    from facepipe.fsutil import write_json_atomic

    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}
    if result.model:
        metrics["model_version"] = int(result.model["version"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, metrics)
