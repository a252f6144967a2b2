"""MLflow for the flows: the runs a stage logged, registered versions, and moving `champion`."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from facepipe.eval.metrics import best_of, mean_over_tables
from facepipe.orchestration.settings import absolute_tracking_uri

__all__ = ["benchmark_score", "choose_champion", "mlflow_runs_since", "model_version", "run_url"]

log = logging.getLogger(__name__)
CHAMPION = "champion"


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"runs:/{run_id} (open with: mlflow ui --backend-store-uri {tracking_uri})"


def mlflow_runs_since(tracking_uri: str, experiment: str, since_ms: int) -> list[dict[str, Any]]:
    """The runs created in `experiment` since `since_ms` (epoch ms): what a stage just logged."""
    mlc = _client(tracking_uri)
    exp = mlc.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = mlc.search_runs([exp.experiment_id], filter_string=f"attributes.start_time >= {since_ms}")
    return [
        {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "stage": r.data.tags.get("stage", ""),
            "status": r.info.status,
            "url": run_url(tracking_uri, exp.experiment_id, r.info.run_id),
        }
        for r in runs
    ]


def model_version(
    tracking_uri: str,
    workdir: str,
    name: str,
    alias: str | None = None,
    version: str | None = None,
    run_ids: list[str] | None = None,
) -> dict[str, Any]:
    """A registered version of `name` with all its aliases: by alias, by version, the version logged
    by one of `run_ids`, or else the newest."""
    from mlflow.exceptions import MlflowException

    uri = absolute_tracking_uri(tracking_uri, workdir)
    mlc = _client(uri)
    try:
        if alias:
            mv = mlc.get_model_version_by_alias(name, alias)
        elif version:
            mv = mlc.get_model_version(name, str(version))
        else:
            versions = mlc.search_model_versions(f"name = '{name}'")
            if run_ids:
                versions = [v for v in versions if v.run_id in set(run_ids)] or versions
            if not versions:
                raise RuntimeError(f"no version of {name} is registered in {uri}")
            mv = max(versions, key=lambda v: int(v.version))
    except MlflowException as err:
        wanted = f"{name}@{alias}" if alias else f"{name} version {version}" if version else name
        raise RuntimeError(f"{wanted} is not in the model registry {uri}: {err}") from err
    mv = mlc.get_model_version(name, mv.version)  # search results carry no aliases
    metrics = {}
    if mv.run_id:
        with contextlib.suppress(MlflowException):
            metrics = dict(mlc.get_run(mv.run_id).data.metrics)
    return {
        "name": name,
        "version": str(mv.version),
        "aliases": sorted(getattr(mv, "aliases", []) or []),
        "run_id": mv.run_id,
        "uri": f"models:/{name}/{mv.version}",
        "tags": dict(mv.tags or {}),
        "metrics": metrics,  # the final metrics of the run that logged this version
    }


def benchmark_score(metrics: dict[str, Any], metric: str) -> float | None:
    """`metric` of one benchmark report (`metrics.json`: one section per pair table), averaged over the
    pair tables that report it; None when none does (the training stages average the same way)."""
    return mean_over_tables(metrics.values(), metric)


def choose_champion(
    tracking_uri: str, workdir: str, name: str, scores: dict[str, float | None], metric: str
) -> dict[str, Any]:
    """Give `champion` to the version of `name` with the best benchmark score on `metric` (higher or lower
    is better as `facepipe.eval.metrics` says; ties keep the current champion, then the newest). Scores of
    one benchmark run only: every version was scored by the same evaluation on the same data, which the
    training stage's own numbers are not."""
    tied = best_of(metric, scores)
    if not tied:
        return {"name": name, "champion": None, "moved": False, "metric": metric, "scores": scores}
    mlc = _client(absolute_tracking_uri(tracking_uri, workdir))
    current = None
    with contextlib.suppress(Exception):
        current = str(mlc.get_model_version_by_alias(name, CHAMPION).version)
    best = current if current in tied else max(tied, key=int)
    moved = best != current
    if moved:
        mlc.set_registered_model_alias(name, CHAMPION, best)
        mlc.set_model_version_tag(name, best, f"benchmark.{metric}", str(scores[best]))
        log.info("%s: champion -> version %s (%s %.4f; was %s)", name, best, metric, scores[best], current)
    return {"name": name, "champion": best, "previous": current, "moved": moved, "metric": metric,
            "scores": scores}  # fmt: skip
