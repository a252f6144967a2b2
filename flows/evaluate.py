"""`benchmark` flow: score registered models on the verification pair tables, then move `champion`.

Each model version is benchmarked once per data version and evaluation settings (the stage marker
pins both) by one `facepipe evaluate` process, writing `<paths.reports>/<model>-v<version>/` (metrics
JSON + PNG plots, and the features `facepipe compare` reuses) with the protocol sets' reports inside.
The backbone's outputs are cached (`<paths.features>/eval-embeddings`), so the heads on one backbone
run only their head. For every model name, the versions scored in this run (the ones asked for, plus
the current champion and challenger) are compared on the model's champion metric
(`facepipe.tracking.champion_metric`: verification accuracy for backbones, EDC pAUC for uncertainty
heads, each in its direction) and `champion` goes to the best; the numbers are returned for the
pipeline's summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from facepipe.eval.embed_cache import FOLDER as CACHE_FOLDER
from facepipe.orchestration.registry import benchmark_score
from facepipe.orchestration.reports import read_metrics, report_dir
from facepipe.orchestration.settings import FlowSettings
from facepipe.orchestration.stage_process import StageFailed
from facepipe.storage import is_remote
from facepipe.tracking import champion_metric, model_names
from flows.stages import move_champion, publish_links, registered_model, run_stage


def benchmark_argv(
    s: FlowSettings, model_uri: str, data: str, out: str, protocols: list[str] | None = None
) -> list[str]:
    """One `facepipe evaluate` per model: the pair tables into `out`, each protocol folder into
    `out/<folder name>`, the backbone's outputs shared with the other models through the cache."""
    argv = ["evaluate", "--model", model_uri, "--shards", data, "--out", out]
    for folder in protocols or []:
        argv += ["--protocol", folder]
    return [*argv, "--embedding-cache", embedding_cache(s), *s.config_args()]


def embedding_cache(s: FlowSettings) -> str:
    """`eval.embedding_cache` when set, else `<paths.features>/eval-embeddings`, or a folder in the
    workdir when the features live in object storage (the cache is local by design)."""
    features = s.config.paths.features
    if s.config.eval.embedding_cache:
        return s.config.eval.embedding_cache
    if is_remote(features):
        return str(Path(s.workdir) / ".facepipe" / CACHE_FOLDER)
    return str(Path(features) / CACHE_FOLDER)


def protocol_folders(s: FlowSettings) -> dict[str, str]:
    """The template/video protocol sets `facepipe synth --protocols` wrote beside the raw dataset, by
    folder name (the name of each one's report folder)."""
    root = Path(s.config.paths.raw) / "protocols"
    return {kind: str(root / kind) for kind in ("ijb", "video") if (Path(s.workdir) / root / kind).is_dir()}


def compare_argv(
    s: FlowSettings, model_uris: list[str], data: str, out: str, reports: list[str] | None = None
) -> list[str]:
    """`facepipe compare` of the heads; with `reports` (their benchmark folders, same order) it reuses
    the features those evaluations saved instead of embedding every head again."""
    argv = ["compare", "--models", *model_uris, "--shards", data, "--out", out]
    return [*argv, *(["--reports", *reports] if reports else []), *s.config_args()]


def _candidates(s: FlowSettings, models: list[str] | None) -> list[dict[str, Any]]:
    """The versions to score: those asked for (models:/name/version) or every model's champion, and
    beside each name its current champion and challenger, so `champion` is decided among them."""
    uri = s.config.tracking.tracking_uri
    asked = [m.removeprefix("models:/").partition("/") for m in models or []]
    names = list(dict.fromkeys(name for name, _, _ in asked)) or list(model_names().values())
    found: dict[str, dict[str, Any]] = {}
    for name, _, version in asked:
        model = registered_model(uri, s.workdir, name, version=version or None)
        found[model["uri"]] = model
    for name in names:
        for alias in ("champion", "challenger"):
            try:
                model = registered_model.fn(uri, s.workdir, name, alias=alias)
            except RuntimeError:
                continue  # that kind of model (or alias) does not exist yet
            found.setdefault(model["uri"], model)
    return list(found.values())


@flow(name="benchmark", retries=1, retry_delay_seconds=10, log_prints=True)
def benchmark(
    workdir: str = ".",
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    models: list[str] | None = None,
    data: str | None = None,
    promote: bool = True,
    run_protocols: bool = True,
) -> dict[str, Any]:
    """Benchmark `models` (models:/name/version URIs; default every model's champion and challenger)
    and, with `promote`, give `champion` to each name's best. With `run_protocols`, each version is also
    scored on the IJB and video sets found beside the raw data (`<report>/ijb`, `<report>/video`).

    Returns {reports: {uri: {dir, metrics, model}}, champions, stages, comparison}.
    """
    s = FlowSettings(workdir, params, overrides)
    data = data or s.config.paths.shards
    resolved = _candidates(s, models)
    protocols = protocol_folders(s) if run_protocols else {}
    reports, stages = {}, []
    for model in resolved:
        out = report_dir(s.config.paths.reports, model)
        # one process per version: one model load scores the pair tables and every protocol set
        stage = run_stage(
            f"benchmark-{model['name']}-v{model['version']}",
            benchmark_argv(s, model["uri"], data, out, list(protocols.values())),
            s.workdir,
            deps=[data, *protocols.values()],
            outs=[out, *(f"{out}/{name}" for name in protocols)],
            params={"eval": s.section("eval"), "model": model["uri"]},
            **s.tracking,
        )
        stages.append(stage)
        out_dir = Path(s.workdir) / out
        reports[model["uri"]] = {"dir": str(out_dir), "metrics": read_metrics(out_dir), "model": model}
    champions = {}
    if promote:
        for name in dict.fromkeys(m["name"] for m in resolved):
            metric = champion_metric(s.config.tracking, name)
            scores = {
                r["model"]["version"]: benchmark_score(r["metrics"].get("metrics", {}), metric)
                for r in reports.values()
                if r["model"]["name"] == name
            }
            champions[name] = move_champion(s.config.tracking.tracking_uri, s.workdir, name, scores, metric)
        for report in reports.values():  # the aliases as they stand after the moves
            model = report["model"]
            report["model"] = registered_model.fn(
                s.config.tracking.tracking_uri, s.workdir, model["name"], version=model["version"]
            )
    comparison = None
    heads = [m["uri"] for m in resolved if m["name"] != model_names()["backbone"]]
    if heads:
        # every head (same backbone) and the quality baselines side by side: EDC, risk, accuracy
        out = str(Path(s.config.paths.reports) / "comparison")
        params = {"eval": s.section("eval"), "models": heads}
        argv = compare_argv(s, heads, data, out, [reports[uri]["dir"] for uri in heads])
        try:
            stages.append(
                run_stage("benchmark-compare", argv, s.workdir, [data], [out], params, **s.tracking)
            )
            comparison = str(Path(s.workdir) / out / "comparison.html")
        except StageFailed as err:  # e.g. heads of different backbones: keep the per-model reports
            print(f"comparison report skipped: {err}")
    links = {"reports": list(reports), "comparison": comparison, "champions": champions}
    publish_links("benchmark", "benchmark: reports and MLflow runs", stages, links)
    return {"reports": reports, "champions": champions, "stages": stages, "comparison": comparison}
