"""`facepipe train backbone|uncertainty|finetune`: the training stages on Ray Train.

    facepipe train backbone [--config params.yaml] [--shards DIR] [--name RUN] [--metrics-out FILE] [k=v ...]
    facepipe train uncertainty --method METHOD --backbone models:/facepipe-backbone@champion
    facepipe train finetune --backbone models:/facepipe-backbone@champion

Re-running with the same `--name` resumes that run from its latest checkpoint. `--shards`, `--address`,
`--backbone`, `--method` and `--no-cache` are shortcuts for `paths.shards`, `<section>.scaling.address`,
`<section>.backbone_uri`, `train_uncertainty.method` and `train_uncertainty.cache_features=false`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from facepipe.commands import options
from facepipe.commands.choices import MethodChoices
from facepipe.console import framework_output_to
from facepipe.orchestration.stage_cache import LOG_DIR

SECTIONS = {"backbone": "train_backbone", "uncertainty": "train_uncertainty", "finetune": "finetune"}


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
        section = SECTIONS[stage]
        sub = options.stage_parser(stages, stage, help=text, description=text)
        options.config_flag(sub, "--shards", key="paths.shards", help="decoded dataset")
        sub.add_argument("--name", default=None, help="run name; an existing run of that name is resumed")
        options.config_flag(
            sub, "--address", key=f"{section}.scaling.address", help="Ray cluster address (unset: local Ray)"
        )
        sub.add_argument("--no-register", action="store_true", help="log to MLflow but do not register")
        sub.add_argument(
            "--events",
            default=None,
            metavar="FILE",
            help="append worker events (start with pid/node, step, checkpoint) as JSON lines",
        )
        if stage != "backbone":
            options.config_flag(
                sub,
                "--backbone",
                key=f"{section}.backbone_uri",
                help="model URI (models:/NAME@ALIAS) or a bundle/checkpoint folder",
            )
        if stage == "uncertainty":
            options.config_flag(
                sub,
                "--method",
                key="train_uncertainty.method",
                choices=MethodChoices(),
                help="uncertainty method",
            )
            options.config_flag(
                sub,
                "--no-cache",
                key="train_uncertainty.cache_features",
                const=False,
                help="recompute backbone features every batch instead of caching them",
            )
        sub.add_argument(
            "--metrics-out",
            default=None,
            metavar="FILE",
            help="also write the final metrics as JSON to FILE (atomically; for `dvc metrics`)",
        )
        options.finish(sub, run)


def run(args: argparse.Namespace) -> int:
    config = options.load(args)
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

        result = train_backbone(config, None, run_name=args.name, register=register, events_path=args.events)
    elif args.stage == "uncertainty":
        from facepipe.train.head import train_uncertainty

        result = train_uncertainty(
            config,
            None,  # the data, method and backbone are config keys (--shards, --method, --backbone)
            run_name=args.name,
            register=register,
            events_path=args.events,
        )
    else:
        from facepipe.train.finetune import finetune

        result = finetune(
            config,
            None,
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
