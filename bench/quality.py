"""Quality on the generated sample dataset (the training issue's section 6). Prints one JSON object.

For each seed: `facepipe synth` (that seed) → decode → the backbone stage through Ray Train for a
wall-clock budget (default 10 minutes, 2 CPU cores) → 10-fold verification on the pair tables, split by
the generated degradation: clean pairs (both images < 0.3), all pairs, heavily degraded pairs (either
image > 0.7). Then each uncertainty head (every registered method: PFE, ProbFace, SCF, DUL) on the frozen
backbone: Spearman of its per-image uncertainty against the degradation level, and accuracy before/after
rejecting the 30% most uncertain pairs. Goals (reported as booleans beside the numbers): clean >= 0.95,
all >= 0.90, heavily degraded at least 5 points below clean, Spearman >= 0.5, rejection raises accuracy.

`edc` (per seed and pair table): ISO/IEC 29794-1 EDC pAUC of every head beside the baselines, one
`facepipe.eval.compare` comparison on the shared backbone, at each `eval.edc_fmr_targets` the pair count
supports (the others are listed under `unsupported`): each row's pAUC (lower is better; `random_expected`
is random discard, `ideal` the oracle curve, `true_degradation` the generator's oracle quality), and per
head `towards_ideal` = (random − head) / (random − ideal): 0 is no better than random discard, 1 is ideal.

    .venv/bin/python bench/quality.py --seeds 0 1 [--minutes 10] [--workdir /tmp/facepipe-quality]

Nothing is tracked in MLflow (the numbers are the product); the Ray cluster is local and stopped after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

GOALS = {"clean": 0.95, "all": 0.90, "degradation_gap": 0.05, "spearman": 0.5}


def _config(args: argparse.Namespace, seed: int, root: Path) -> Any:
    from facepipe.config import load_config

    overrides = [
        f"seed={seed}",
        f"paths.raw={root / 'raw'}",
        f"paths.shards={root / 'shards'}",
        f"paths.runs={root / 'runs'}",
        f"paths.features={root / 'features'}",
        f"paths.reports={root / 'reports'}",
        f"synth.seed={seed}",
        f"synth.identities={args.identities}",
        f"synth.images_per_identity={args.images_per_identity}",
        f"synth.pairs={args.pairs}",
        f"train_backbone.seed={seed}",
        f"train_backbone.max_minutes={args.minutes}",
        f"train_backbone.epochs={args.epochs}",
        f"train_backbone.scaling.num_workers={args.workers}",
        f"train_backbone.scaling.cpus_per_worker={args.cpus_per_worker}",
        f"train_uncertainty.seed={seed}",
        f"train_uncertainty.epochs={args.head_epochs}",
        # the generated identities carry left/right-asymmetric cues (hair parting, moles, marks) that a
        # mirrored copy contradicts: no flip augmentation, and no mirror averaging when scoring
        "train_backbone.loader.flip=false",
        "eval.flip=false",
        *args.set,
    ]
    return load_config(args.params, overrides)


def _prepare(config: Any) -> dict[str, float]:
    from facepipe.data.decode.job import decode_dataset
    from facepipe.data.synth.generate import generate

    t0 = time.monotonic()
    s = config.synth
    generate(Path(config.paths.raw), s, workers=s.workers)  # the synth section is the SynthConfig
    t1 = time.monotonic()
    decode_dataset([config.paths.raw], config.paths.shards, workers=config.decode.workers)
    return {"synth_s": round(t1 - t0, 1), "decode_s": round(time.monotonic() - t1, 1)}


def _backbone(config: Any, name: str, out: Path) -> dict[str, Any]:
    from facepipe.eval.model_features import evaluate_model, load_eval_model
    from facepipe.train.backbone import train_backbone

    result = train_backbone(config, run_name=name, register=False, track=False)
    model = load_eval_model(str(result.bundle_dir))
    summary, _ = evaluate_model(
        model, config.paths.shards, out, n_folds=config.eval.folds, flip=config.eval.flip
    )
    report: dict[str, Any] = {
        "train_seconds": round(result.seconds, 1),
        "steps": result.metrics.get("step"),
        "samples_s": result.metrics.get("train/samples_s"),
        "bundle": str(result.bundle_dir),
    }
    for table, m in summary.items():
        report[table] = {
            "all": m["accuracy"],
            "clean": m.get("clean_accuracy"),
            "degraded": m.get("degraded_accuracy"),
            "heavily_degraded": m.get("heavily_degraded_accuracy"),
            "pairs": {k: m[k] for k in m if k.startswith("n_") and k.endswith("_pairs")},
        }
    return report


def _head(config: Any, method: str, bundle: str, name: str) -> dict[str, Any]:
    from facepipe.train.head import train_uncertainty

    result = train_uncertainty(
        config, method=method, backbone_uri=bundle, run_name=name, register=False, track=False
    )
    out: dict[str, Any] = {"train_seconds": round(result.seconds, 1)}
    out["head_dir"] = str(result.extra["head_dir"])  # the EDC comparison loads the head from here
    for key, value in result.metrics.items():
        if key.startswith("val/") and isinstance(value, float):
            table, metric = key.split("/")[1:3]
            out.setdefault(table, {})[metric] = round(value, 4)
    return out


def _edc(config: Any, bundle: str, heads: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """Per pair table: every head's EDC pAUC beside random discard and the oracles (module docstring)."""
    from facepipe.data.dataset import Dataset
    from facepipe.eval.compare import CompareSettings, compare_table
    from facepipe.eval.model_features import EvalModel
    from facepipe.models.bundle import find_bundle, load_bundle
    from facepipe.uncertainty.head_io import load_head

    backbone, info, _ = load_bundle(find_bundle(bundle))
    models = []
    for head in heads.values():
        loaded = load_head(head["head_dir"])
        models.append(EvalModel(backbone, info, loaded, str(loaded.method), head["head_dir"]))
    settings = CompareSettings.from_config(config.eval)
    report: dict[str, Any] = {}
    for table, path in Dataset.at(config.paths.shards).pair_tables.items():
        comp = compare_table(models, list(heads), path, out, settings)
        rows = {row["method"]: row["pauc"] for row in comp.rows}
        entry: dict[str, Any] = {"n_pairs": comp.n_pairs, "unsupported": comp.unsupported, "pauc": {}}
        entry["towards_ideal"] = {}
        for key in rows["ideal"]:
            if key in comp.unsupported:
                continue
            pauc = {name: round(p[key], 6) for name, p in rows.items()}
            entry["pauc"][key] = pauc
            entry["towards_ideal"][key] = {m: _towards_ideal(pauc, m) for m in heads}
        report[table] = entry
    return report


def _towards_ideal(pauc: dict[str, float], method: str) -> float | None:
    """(random − method) / (random − ideal): 0 = random discard, 1 = ideal; None when they coincide."""
    span = pauc["random_expected"] - pauc["ideal"]
    return round((pauc["random_expected"] - pauc[method]) / span, 4) if span > 0 else None


def _verdict(seed_report: dict[str, Any], table: str) -> dict[str, bool]:
    bb = seed_report["backbone"][table]
    verdict = {
        "clean_ge_0.95": bb["clean"] is not None and bb["clean"] >= GOALS["clean"],
        "all_ge_0.90": bb["all"] >= GOALS["all"],
        "heavy_5pt_below_clean": bb["heavily_degraded"] is not None
        and bb["clean"] - bb["heavily_degraded"] >= GOALS["degradation_gap"],
    }
    for method, head in seed_report.get("heads", {}).items():
        m = head.get(table, {})
        verdict[f"{method}_spearman_ge_0.5"] = m.get("spearman_degradation", 0.0) >= GOALS["spearman"]
        verdict[f"{method}_rejection_helps"] = m.get("risk_acc_reject_30", 0.0) > m.get(
            "risk_acc_reject_0", 1.0
        )
    for key, towards in seed_report.get("edc", {}).get(table, {}).get("towards_ideal", {}).items():
        for method, value in towards.items():
            verdict[f"{method}_edc_{key}_beats_random"] = value is not None and value > 0
    return verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--identities", type=int, default=2000)
    parser.add_argument("--images-per-identity", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=10.0, help="backbone wall-clock budget")
    parser.add_argument("--epochs", type=int, default=30, help="upper bound; the budget normally ends it")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers for the backbone")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="torch threads per worker")
    parser.add_argument("--head-epochs", type=int, default=4)
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument("--params", default=None, help="params.yaml to start from (default: the repo's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override")
    parser.add_argument("--workdir", default="/tmp/facepipe-quality")
    args = parser.parse_args(argv)

    from facepipe.cluster import ray_session
    from facepipe.uncertainty.registry import method_names

    methods = [m for m in args.methods.split(",") if m] if args.methods else method_names()
    result: dict[str, Any] = {"config": dict(vars(args)), "seeds": {}}
    # the stages print their summaries on stdout, which carries only this script's JSON
    with ray_session(None), contextlib.redirect_stdout(sys.stderr):
        for seed in args.seeds:
            root = Path(args.workdir) / f"seed{seed}"
            config = _config(args, seed, root)
            report: dict[str, Any] = {"prepare": _prepare(config)}
            report["backbone"] = _backbone(config, f"quality-backbone-{seed}", root / "eval")
            bundle = report["backbone"]["bundle"]
            report["heads"] = {m: _head(config, m, bundle, f"quality-{m}-{seed}") for m in methods}
            report["edc"] = _edc(config, bundle, report["heads"], root / "edc")
            report["goals_met"] = {
                t: _verdict(report, t) for t in report["backbone"] if isinstance(report["backbone"][t], dict)
            }
            result["seeds"][str(seed)] = report
            print(json.dumps({f"seed {seed}": report["backbone"]}, default=str), file=sys.stderr)
    result["load_average_1m"] = os.getloadavg()[0]
    json.dump(result, sys.stdout, indent=1, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
