"""`benchmark` flow: score registered models on the verification pair tables.

Each model version is benchmarked once per data version and evaluation settings (the stage marker
pins both), writing `<paths.reports>/<model>-v<version>/` (metrics JSON + PNG plots); the numbers are
returned for the pipeline's summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow

from facepipe.tracking import model_names
from flows.stages import (
    FlowSettings,
    StageFailed,
    cli_supports,
    publish_links,
    registered_model,
    run_stage,
)


def benchmark_argv(s: FlowSettings, model_uri: str, data: str, out: str) -> list[str]:
    return ["evaluate", "--model", model_uri, "--shards", data, "--out", out, *s.config_args()]


def compare_argv(s: FlowSettings, model_uris: list[str], data: str, out: str) -> list[str]:
    return ["compare", "--models", *model_uris, "--shards", data, "--out", out, *s.config_args()]


def report_dir(s: FlowSettings, model: dict[str, Any]) -> str:
    return str(Path(s.config.paths.reports) / f"{model['name']}-v{model['version']}")


def read_metrics(out_dir: Path) -> dict[str, Any]:
    """The metrics JSON files a benchmark wrote (one per pair table, or one in total), by file stem."""
    found = {}
    for path in sorted(out_dir.rglob("*.json")):
        try:
            found[str(path.relative_to(out_dir).with_suffix(""))] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return found


@flow(name="benchmark", retries=1, retry_delay_seconds=10, log_prints=True)
def benchmark(
    workdir: str = ".",
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    models: list[str] | None = None,
    alias: str = "champion",
    data: str | None = None,
) -> dict[str, Any]:
    """Benchmark `models` (models:/name/version URIs), by default every facepipe model's `alias`.

    Returns {reports: {uri: {dir, metrics, model}}, stages}.
    """
    s = FlowSettings(workdir, params, overrides)
    if not cli_supports(["evaluate"], "--model"):
        reason = "this facepipe's `evaluate` cannot score a registered model yet (no --model)"
        print(f"benchmark skipped: {reason}")
        return {"reports": {}, "stages": [], "skipped": reason}
    data = data or s.config.paths.shards
    uri = s.config.tracking.tracking_uri
    resolved = []
    if models:
        for m in models:
            name, _, version = m.removeprefix("models:/").partition("/")
            resolved.append(registered_model(uri, s.workdir, name, version=version or None))
    else:
        for name in model_names().values():
            try:
                resolved.append(registered_model.fn(uri, s.workdir, name, alias=alias))
            except RuntimeError:
                continue  # that kind of model has not been trained yet
    reports, stages = {}, []
    for model in resolved:
        out = report_dir(s, model)
        stage = run_stage(
            f"benchmark-{model['name']}-v{model['version']}",
            benchmark_argv(s, model["uri"], data, out),
            s.workdir,
            deps=[data],
            outs=[out],
            params={"eval": s.section("eval"), "model": model["uri"]},
            **s.tracking,
        )
        stages.append(stage)
        out_dir = Path(s.workdir) / out
        reports[model["uri"]] = {"dir": str(out_dir), "metrics": read_metrics(out_dir), "model": model}
    comparison = None
    heads = [m["uri"] for m in resolved if m["name"] != model_names()["backbone"]]
    if heads and cli_supports(["compare"], "--models"):
        # every head (same backbone) and the quality baselines side by side: EDC, risk, accuracy
        out = str(Path(s.config.paths.reports) / "comparison")
        params = {"eval": s.section("eval"), "models": heads}
        argv = compare_argv(s, heads, data, out)
        try:
            stages.append(
                run_stage("benchmark-compare", argv, s.workdir, [data], [out], params, **s.tracking)
            )
            comparison = str(Path(s.workdir) / out / "comparison.html")
        except StageFailed as err:  # e.g. heads of different backbones: keep the per-model reports
            print(f"comparison report skipped: {err}")
    links = {"reports": list(reports), "comparison": comparison}
    publish_links("benchmark", "benchmark: reports and MLflow runs", stages, links)
    return {"reports": reports, "stages": stages, "comparison": comparison}
