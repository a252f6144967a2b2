"""MLflow tracking and model registry: runs, metrics, model versions, `challenger`/`champion` aliases.

The driver opens a run (params, config, data and code version tags) and hands its id to Ray Train's
rank-0 worker, which logs per-step and per-epoch metrics into it through `MetricLogger`. At the end the
driver logs the plots and the trained model as a pyfunc (explicit signature and pip requirements, so
nothing is inferred: inference costs ~14 s and guesses), registers it, gives the new version the
alias `challenger`, and moves `champion` to it when it beats the current champion on
`tracking.champion_metric` (higher is better).

A registered model holds a backbone bundle (see `facepipe.models.bundle`) and, for the uncertainty
stages, the head's weights: `models:/<name>@champion` loads back as a pyfunc returning the same
embeddings (and uncertainties), and `download_model` gives the stages the bundle itself.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from facepipe.config import Config, TrackingConfig, dump_config, flatten
from facepipe.errors import FacepipeError
from facepipe.fsutil import sha256_file
from facepipe.models.bundle import find_bundle, read_bundle_info

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
    """Tags that pin the training data: the manifest's sha256 and the DVC md5 when DVC tracks it."""
    tags: dict[str, str] = {"data.path": str(shards_dir)}
    manifest = Path(shards_dir) / "manifest.json"
    if manifest.is_file():
        tags["data.manifest_sha256"] = sha256_file(manifest)
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


# ---------------------------------------------------------------------------------------------
# Models: pyfunc wrapper, logging, registration, aliases
# ---------------------------------------------------------------------------------------------


def _python_model() -> Any:
    from mlflow.pyfunc import PythonModel

    class FacepipeModel(PythonModel):
        """Images (float32 NCHW, normalised as in training) -> embeddings (and uncertainties)."""

        def load_context(self, context):
            from facepipe.models.bundle import load_bundle

            self.backbone, self.info, _ = load_bundle(context.artifacts["bundle"])
            self.head = None
            head_dir = context.artifacts.get("head")
            if head_dir:
                from facepipe.uncertainty.head_io import load_head  # lazy: torch

                self.head = load_head(head_dir, self.info)

        def predict(self, context, model_input, params=None):  # no hints: MLflow would validate by them
            import numpy as np
            import torch

            if isinstance(model_input, dict):  # a named tensor signature hands inputs over by name
                model_input = model_input["images"]
            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            with torch.no_grad():
                emb, fmap = self.backbone.forward_features(x)
                if self.head is None:
                    return emb.numpy()
                unc = self.head.uncertainty(emb, fmap)
            return {"embedding": emb.numpy(), "uncertainty": unc.numpy()}

    return FacepipeModel()


def pip_requirements() -> list[str]:
    """Pinned versions of what loading a facepipe model imports (the package itself ships as code)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "torch", "numpy", "pyyaml", "pydantic", "scipy")]


def signature(input_size: tuple[int, int], embedding_size: int, uncertainty_size: int | None = None) -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    h, w = input_size
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, 3, h, w), "images")])
    outputs = [TensorSpec(np.dtype(np.float32), (-1, embedding_size), "embedding")]
    if uncertainty_size is not None:
        outputs.append(TensorSpec(np.dtype(np.float32), (-1, uncertainty_size), "uncertainty"))
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


def log_and_register(
    tracking: TrackingConfig,
    run_id: str,
    stage: str,
    bundle_dir: str | os.PathLike,
    metrics: dict[str, float],
    head_dir: str | os.PathLike | None = None,
    uncertainty_size: int | None = None,
) -> dict[str, Any]:
    """Log the model into `run_id`, register it under the stage's name, set aliases.

    Returns {"name", "version", "uri", "champion": bool, "metric": value}.
    """
    import mlflow

    name = model_name(stage)
    mlc = client(tracking)
    bundle_dir = find_bundle(bundle_dir)
    info = read_bundle_info(bundle_dir)
    artifacts = {"bundle": str(bundle_dir)}
    if head_dir is not None:
        artifacts["head"] = str(head_dir)
        if uncertainty_size is None:
            from facepipe.uncertainty.head_io import head_uncertainty_size  # lazy: torch

            uncertainty_size = head_uncertainty_size(head_dir)
    package_dir = Path(__file__).resolve().parent
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        model_info = mlflow.pyfunc.log_model(
            name="model",
            python_model=_python_model(),
            artifacts=artifacts,
            code_paths=[str(package_dir)],
            signature=signature(info.input_size, info.embedding_size, uncertainty_size),
            pip_requirements=pip_requirements(),
            registered_model_name=name,
            await_registration_for=60,
        )
    version = str(model_info.registered_model_version)
    metric_name = tracking.champion_metric
    value = metrics.get(metric_name)
    for key, val in metrics.items():
        if isinstance(val, int | float):
            mlc.set_model_version_tag(name, version, METRIC_TAG + key, str(float(val)))
    run = mlc.get_run(run_id)
    for key in ("git.commit", "data.manifest_sha256", "data.dvc_md5", "config.yaml_sha256"):
        if key in run.data.tags:
            mlc.set_model_version_tag(name, version, key, run.data.tags[key])
    champion = promote(tracking, name, version, value)
    return {
        "name": name,
        "version": version,
        "uri": f"models:/{name}/{version}",
        "champion": champion,
        "metric": value,
    }


def promote(tracking: TrackingConfig, name: str, version: str, value: float | None) -> bool:
    """Give `version` the alias `challenger`; also `champion` if it beats the champion's metric."""
    from mlflow.exceptions import MlflowException

    mlc = client(tracking)
    mlc.set_registered_model_alias(name, CHALLENGER, version)
    try:
        current = mlc.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    best = None
    if current is not None:
        raw = current.tags.get(METRIC_TAG + tracking.champion_metric)
        best = float(raw) if raw is not None else None
    wins = current is None or (value is not None and (best is None or value > best))
    if wins:
        mlc.set_registered_model_alias(name, CHAMPION, version)
        log.info(
            "%s version %s is the new champion (%s=%s, was %s)",
            name,
            version,
            tracking.champion_metric,
            value,
            best,
        )
    return wins


def download_model(uri: str, tracking: TrackingConfig, dst: str | os.PathLike | None = None) -> Path:
    """Download a registered model's artifacts (e.g. `models:/facepipe-backbone@champion`)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client(tracking)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dst) if dst else None, tracking_uri=tracking.tracking_uri
        )
    except MlflowException as err:
        raise FacepipeError(f"cannot load model {uri}: {err.message}") from err
    return Path(local)


def load_model(uri: str, tracking: TrackingConfig) -> Any:
    """The pyfunc model behind `uri` (`predict(images NCHW float32)` -> embeddings)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client(tracking)
    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as err:
        raise FacepipeError(f"cannot load model {uri}: {err.message}") from err


def resolve_bundle(source: str, tracking: TrackingConfig, dst: str | os.PathLike | None = None) -> Path:
    """A local backbone bundle from a `models:/...` / `runs:/...` URI or a bundle/checkpoint path."""
    if "://" in source or source.startswith("models:/") or source.startswith("runs:/"):
        return find_bundle(download_model(source, tracking, dst))
    path = Path(source)
    if not path.exists():
        raise FacepipeError(f"backbone {source} is neither a model URI nor an existing path")
    return find_bundle(path)
