"""`pipeline` flow: the whole DAG as subflows — ingest → backbone → uncertainty heads → benchmark.

Call it like a function (the demo does): `pipeline(workdir=..., params=..., ray_address=...,
methods=[...])` runs it under whichever Prefect API is configured (PREFECT_API_URL) and returns the
summary dict; it is also deployed by prefect.yaml. A retry or a second run redoes only stages whose
inputs changed (see flows.stages).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow

from facepipe.fsutil import write_json_atomic
from facepipe.orchestration.settings import FlowSettings
from flows.evaluate import benchmark
from flows.ingest import ingest
from flows.stages import publish_links
from flows.train import HEAD_FLOWS, train_backbone, train_finetune

HEADLINE_KEYS = ("accuracy", "std", "val", "auc", "tar")


def headline(metrics: Any, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """The headline numbers of a metrics JSON (accuracy, VAL/TAR, AUC ...), flattened `a.b` keys."""
    out: dict[str, float] = {}
    if isinstance(metrics, dict) and depth < 3:
        for key, value in metrics.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                if any(str(key).lower().startswith(k) for k in HEADLINE_KEYS):
                    out[name] = float(value)
            else:
                out.update(headline(value, name, depth + 1))
    return out


@flow(name="pipeline", log_prints=True)
def pipeline(
    workdir: str = ".",
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    methods: list[str] | None = None,
    synthesize: bool = True,
    version_data: bool = True,
    dvc_remote: str | None = None,
    ray_address: str | None = None,
    num_workers: int | None = None,
    use_gpu: bool | None = None,
    finetune: bool = True,
) -> dict[str, Any]:
    """Run every stage; returns {models, benchmark, reports, data_version, mlflow_runs, summary_path}.

    `finetune`: also fine-tune the backbone with triplets and the centre term (the video model's second
    stage); the benchmark then scores it beside the backbone it started from.

    `methods`: the uncertainty heads to train (default: every registered method). `ray_address`: a Ray
    cluster for the training stages (None: each stage starts local Ray); `num_workers`/`use_gpu`:
    the backbone stage's Ray Train scaling.
    """
    started = time.monotonic()
    methods = list(methods) if methods is not None else list(HEAD_FLOWS)
    unknown = sorted(set(methods) - set(HEAD_FLOWS))
    if unknown:
        raise ValueError(f"unknown uncertainty methods {unknown}; choose from {sorted(HEAD_FLOWS)}")
    s = FlowSettings(workdir, params, overrides)  # fails fast on a bad params file, before any work
    common = {"workdir": s.workdir, "params": s.params, "overrides": s.overrides}

    data = ingest(**common, synthesize=synthesize, version_data=version_data, dvc_remote=dvc_remote)
    train_data = data["train_data"]
    backbone = train_backbone(
        **common, data=train_data, ray_address=ray_address, num_workers=num_workers, use_gpu=use_gpu
    )
    # the later stages build on the backbone trained here (pinned, not by alias: the benchmark may
    # move `champion`, and a rerun must find them up to date)
    later = {**common, "data": train_data, "ray_address": ray_address, "run_benchmark": False,
             "backbone_version": backbone["model"]["version"]}  # fmt: skip
    heads = {m: HEAD_FLOWS[m](**later) for m in methods}
    tuned = train_finetune(**later) if finetune else None
    models = [backbone["model"], *(h["model"] for h in heads.values()), *([tuned["model"]] if tuned else [])]
    bench = benchmark(**common, models=[m["uri"] for m in models], data=train_data)

    trained = [backbone["stage"], *(h["stage"] for h in heads.values()), *([tuned["stage"]] if tuned else [])]
    stages = [*data["stages"], *trained, *bench["stages"]]
    # aliases as they stand after the benchmark (it may have moved `champion`)
    current = {r["model"]["uri"]: r["model"] for r in bench["reports"].values()}
    summary = {
        "workdir": s.workdir,
        "data_version": (data["data_version"] or {}).get("md5"),
        "train_data": train_data,  # absolute or a URI: FlowSettings pinned relative paths
        "models": [
            {k: current.get(m["uri"], m)[k] for k in ("name", "version", "aliases", "uri", "run_id")}
            for m in models
        ],
        "benchmark": {
            m["uri"]: {n: headline(v) for n, v in bench["reports"][m["uri"]]["metrics"].items()}
            for m in models  # each was benchmarked: the flow scores every version it is given
        },
        "reports": [r["dir"] for r in bench["reports"].values()],
        "comparison_report": bench.get("comparison"),  # heads + baselines side by side (HTML)
        "mlflow_runs": [run for st in stages for run in st.get("mlflow_runs", [])],
        "stages": {
            st["name"]: "up to date" if st.get("skipped") else f"ran in {st.get('seconds')} s"
            for st in stages
        },
        "tracking_uri": s.config.tracking.tracking_uri,
        "seconds": round(time.monotonic() - started, 1),
    }
    summary_path = Path(s.workdir) / s.config.paths.reports / "pipeline-summary.json"
    write_json_atomic(summary_path, summary)
    summary["summary_path"] = str(summary_path)
    publish_links("pipeline", "facepipe pipeline", stages, {"summary": summary_path})
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.pipeline ...`: run the pipeline flow in this process and print its summary JSON.

    The demo starts it as a subprocess with PREFECT_API_URL (and the Ray token variables) in its
    environment, so facepipe itself never imports Prefect.
    """
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=pipeline.description)
    parser.add_argument("--workdir", default=".")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--methods", default=",".join(HEAD_FLOWS), help="comma-separated (default: all)")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--no-synthesize", dest="synthesize", action="store_false")
    parser.add_argument("--no-version-data", dest="version_data", action="store_false")
    parser.add_argument("--dvc-remote", default=None)
    parser.add_argument(
        "--no-finetune", dest="finetune", action="store_false", help="skip the fine-tune stage"
    )
    parser.add_argument("--summary-json", default=None, help="also write the summary here")
    options = vars(parser.parse_args(argv))  # every dest but summary_json is a pipeline() parameter
    summary_json = options.pop("summary_json")
    options["methods"] = [m for m in options["methods"].split(",") if m]
    summary = pipeline(**options)
    text = json.dumps(summary, indent=2, default=str)
    if summary_json:
        write_json_atomic(summary_json, summary)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
