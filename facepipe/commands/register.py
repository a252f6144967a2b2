"""`facepipe register`: register a trained model in MLflow, or show / move a model's aliases.

    facepipe register backbone RUNS/NAME/checkpoint_.../bundle --metrics reports/metrics.json
    facepipe register probface BUNDLE --head HEAD_DIR --metric accuracy=0.97
    facepipe register backbone --show
    facepipe register backbone --champion 3

A new version gets the alias `challenger`; it takes `champion` when it beats the current champion on
`tracking.champion_metric` (backbones) or `tracking.head_champion_metric` (heads). The training stages
do this themselves; this command is for models trained elsewhere, re-registration after an evaluation,
or a manual promotion.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from facepipe.commands import options
from facepipe.commands.choices import MethodChoices
from facepipe.errors import FacepipeError

HELP = "register a model in MLflow (challenger / champion aliases) or show aliases"

DESCRIPTION = "Register a backbone bundle (and uncertainty head) in the MLflow model registry."


def register(subparsers) -> None:
    parser = options.stage_parser(subparsers, "register", HELP, DESCRIPTION)
    parser.add_argument("stage", choices=MethodChoices("backbone"))
    parser.add_argument("source", nargs="?", help="bundle folder (or a checkpoint holding one)")
    parser.add_argument("--head", default=None, help="uncertainty head folder (for a method's stage)")
    parser.add_argument("--metrics", type=Path, default=None, help="JSON file of metrics (flat)")
    parser.add_argument("--metric", action="append", default=[], metavar="NAME=VALUE", help="a metric")
    parser.add_argument("--show", action="store_true", help="list versions and aliases")
    parser.add_argument("--champion", default=None, metavar="VERSION", help="give VERSION the champion alias")
    options.finish(parser, run)


def show_lines(mlc: Any, name: str, metric: str) -> list[str]:
    """One line per version, newest first: version, aliases, run id, the champion metric, created (UTC).

    Aliases come from the registered model: `search_model_versions` leaves them out on some stores.
    """
    from mlflow.exceptions import MlflowException

    from facepipe import tracking

    try:
        by_version: dict[str, list[str]] = {}
        for alias, version in (mlc.get_registered_model(name).aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        versions = mlc.search_model_versions(f"name='{name}'")
    except MlflowException as err:
        raise FacepipeError(f"no registered model {name!r} at this tracking URI: {err.message}") from err
    lines = [f"{name}: {len(versions)} version(s); {metric} is the champion metric"]
    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        aliases = ",".join(sorted(by_version.get(str(version.version), []))) or "-"
        value = version.tags.get(tracking.METRIC_TAG + metric, "-")
        created = datetime.fromtimestamp(version.creation_timestamp / 1000, tz=UTC)
        lines.append(
            f"  v{version.version:<4} aliases={aliases:<20} run={version.run_id or '-'}  "
            f"{metric}={value}  created={created:%Y-%m-%d %H:%M:%S} UTC"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    from facepipe import tracking

    config = options.load(args)
    name = tracking.model_name(args.stage)
    mlc = tracking.client(config.tracking)
    if args.champion:
        mlc.set_registered_model_alias(name, tracking.CHAMPION, str(args.champion))
        print(f"{name}: champion -> version {args.champion}")
        return 0
    if args.show:
        for line in show_lines(mlc, name, tracking.champion_metric(config.tracking, args.stage)):
            print(line)
        return 0
    if not args.source:
        raise FacepipeError("give a bundle folder to register (or --show / --champion VERSION)")
    metrics: dict[str, float] = {}
    if args.metrics:
        try:
            loaded = json.loads(args.metrics.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise FacepipeError(f"cannot read metrics {args.metrics}: {err}") from err
        metrics.update({k: float(v) for k, v in loaded.items() if isinstance(v, int | float)})
    for item in args.metric:
        key, sep, value = item.partition("=")
        try:
            metrics[key] = float(value)
        except ValueError:
            raise FacepipeError(f"--metric {item!r} must look like name=number") from None
        if not sep:
            raise FacepipeError(f"--metric {item!r} must look like name=number")
    if args.stage != "backbone" and not args.head:
        raise FacepipeError(f"{args.stage} needs --head (the trained uncertainty head folder)")
    run_id = tracking.start_run(config, f"register-{args.stage}", None, "tracking", f"register-{args.stage}")
    tracking.log_metrics(config.tracking, run_id, metrics)
    out = tracking.log_and_register(
        config.tracking, run_id, args.stage, args.source, metrics, head_dir=args.head
    )
    tracking.end_run(config.tracking, run_id)
    print(f"{out['name']} v{out['version']}: challenger{' + champion' if out['champion'] else ''}")
    return 0
