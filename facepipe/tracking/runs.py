"""MLflow runs: the registered model names, data and code versions, opening and closing runs, metrics."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from facepipe import storage
from facepipe.config import Config, TrackingConfig, dump_config, flatten
from facepipe.errors import FacepipeError

log = logging.getLogger(__name__)


CHALLENGER = "challenger"
CHAMPION = "champion"
BACKBONE_MODEL = "facepipe-backbone"
METRIC_TAG = "metric."  # version tags carry the metrics the champion decision used


def model_name(stage: str) -> str:
    """The registered model of a stage: the backbone's, or the uncertainty method's (from its registry)."""
    names = model_names()
    if stage not in names:
        raise FacepipeError(f"unknown stage {stage!r}; known: {sorted(names)}")
    return names[stage]


def champion_metric(tracking: TrackingConfig, model: str) -> str:
    """The metric that decides `champion` for `model` (a stage, `backbone` or a method, or a registered
    model name): `tracking.champion_metric` for backbones, `tracking.head_champion_metric` for heads.
    The key and its direction are those of `facepipe.eval.metrics` (see there why heads use EDC pAUC)."""
    from facepipe.eval.metrics import metric

    key = tracking.champion_metric if model in ("backbone", BACKBONE_MODEL) else tracking.head_champion_metric
    try:
        metric(key)
    except ValueError as err:
        raise FacepipeError(f"tracking: {err}") from None
    return key


def model_names() -> dict[str, str]:
    """stage -> registered model name, for the backbone and every registered uncertainty method."""
    from facepipe.uncertainty.registry import METHODS  # lazy: torch

    return {"backbone": BACKBONE_MODEL, **{name: spec.model_name for name, spec in METHODS.items()}}


# ---------------------------------------------------------------------------------------------
# Versions of data and code
# ---------------------------------------------------------------------------------------------


def git_commit(start: str | os.PathLike | None = None) -> str | None:
    """The commit of the git checkout holding `start` (default: this package), or None."""
    where = Path(start) if start else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def dvc_md5(path: str | os.PathLike) -> str | None:
    """The md5 DVC recorded for `path`: from `<path>.dvc`, or from a `dvc.lock` in a parent directory."""
    path = Path(path).resolve()
    dvc_file = path.with_name(path.name + ".dvc")
    if dvc_file.is_file():
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
        for out in outs:
            if out.get("md5"):
                return str(out["md5"])
    for parent in path.parents:
        lock = parent / "dvc.lock"
        if lock.is_file():
            data = yaml.safe_load(lock.read_text()) or {}
            for stage in (data.get("stages") or {}).values():
                for out in stage.get("outs") or []:
                    if out.get("md5") and (parent / out.get("path", "")).resolve() == path:
                        return str(out["md5"])
            break
    return None


def data_version(shards_dir: str | os.PathLike) -> dict[str, str]:
    """Tags that pin the training data: the manifest's sha256, the dataset's content fingerprint
    (`Dataset.fingerprint`: its shards and pair tables) and the DVC md5 when DVC tracks it."""
    from facepipe.data.dataset import Dataset

    tags: dict[str, str] = {"data.path": str(shards_dir)}
    dataset = Dataset.at(shards_dir)
    if dataset.has_manifest():
        tags["data.manifest_sha256"] = hashlib.sha256(storage.read_bytes(dataset.manifest_path)).hexdigest()
        tags["data.fingerprint"] = dataset.fingerprint
    if storage.is_remote(shards_dir):  # DVC pins local outputs only
        return tags
    md5 = dvc_md5(shards_dir)
    if md5:
        tags["data.dvc_md5"] = md5
    return tags


# ---------------------------------------------------------------------------------------------
# Runs and metrics
# ---------------------------------------------------------------------------------------------


def client(tracking: TrackingConfig) -> Any:
    import mlflow
    from mlflow import MlflowClient

    storage.mlflow_s3_env()  # artefacts on S3: MLflow's boto3 needs the endpoint under its own name
    mlflow.set_tracking_uri(tracking.tracking_uri)
    mlflow.set_registry_uri(tracking.tracking_uri)
    return MlflowClient(tracking_uri=tracking.tracking_uri, registry_uri=tracking.tracking_uri)


def experiment_id(tracking: TrackingConfig) -> str:
    """The experiment's id, creating it (with `artifact_location` when configured) if needed."""
    mlc = client(tracking)
    found = mlc.get_experiment_by_name(tracking.experiment)
    if found is not None:
        return found.experiment_id
    location = tracking.artifact_location
    if location and "://" not in location:
        location = Path(location).resolve().as_uri()
    return mlc.create_experiment(tracking.experiment, artifact_location=location)


def start_run(
    config: Config,
    stage: str,
    shards_dir: str | os.PathLike | None,
    section: str,
    run_name: str | None = None,
) -> str:
    """Create a run for `stage` with params (the stage's config section), tags and the full config."""
    mlc = client(config.tracking)
    tags = {"stage": stage, "config.yaml_sha256": _sha256_text(dump_config(config))}
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
    if shards_dir is not None:
        tags.update(data_version(shards_dir))
    run = mlc.create_run(experiment_id(config.tracking), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    params = {k: v for k, v in flatten(config).items() if k.startswith(section + ".") or k == "seed"}
    _log_params(mlc, run_id, params)
    mlc.log_text(run_id, dump_config(config), "config/params.yaml")
    return run_id


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _log_params(mlc: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mlc.log_batch(run_id, params=items[i : i + 100])


class MetricLogger:
    """Buffered per-step metric logging into an existing run (used by the rank-0 worker)."""

    def __init__(
        self, tracking_uri: str | None, run_id: str | None, flush_every: int = 50, flush_seconds: float = 5.0
    ):
        self.enabled = bool(tracking_uri and run_id)
        self.run_id = run_id
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds  # live curves in the UI without a database write per step
        self._last_flush = time.monotonic()
        self._buffer: list[Any] = []
        self._client = None
        if self.enabled:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.enabled and self._buffer:
            for i in range(0, len(self._buffer), 1000):
                self._client.log_batch(self.run_id, metrics=self._buffer[i : i + 1000])
            self._buffer.clear()
        self._last_flush = time.monotonic()


def log_metrics(tracking: TrackingConfig, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    logger = MetricLogger(tracking.tracking_uri, run_id)
    logger.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step)
    logger.flush()


def log_artifacts(tracking: TrackingConfig, run_id: str, paths: list[str | os.PathLike], folder: str) -> None:
    mlc = client(tracking)
    for path in paths:
        mlc.log_artifact(run_id, str(path), folder)


def end_run(tracking: TrackingConfig, run_id: str, status: str = "FINISHED") -> None:
    client(tracking).set_terminated(run_id, status=status)
