"""MLflow model registry: the pyfunc and its signature, registering a version, `challenger`/`champion`,
and loading a registered model back (the pyfunc, or the bundle itself)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from facepipe.config import TrackingConfig
from facepipe.errors import FacepipeError
from facepipe.eval.metrics import is_better
from facepipe.models.bundle import find_bundle, read_bundle_info
from facepipe.tracking.runs import CHALLENGER, CHAMPION, METRIC_TAG, champion_metric, client, model_name

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Models: pyfunc wrapper, logging, registration, aliases
# ---------------------------------------------------------------------------------------------


def _python_model() -> Any:
    from facepipe.models.export import python_model  # tensors or encoded images in, see there

    return python_model()


def pip_requirements() -> list[str]:
    """Pinned versions of what loading a facepipe model imports (the package itself ships as code)."""
    from importlib.metadata import version

    pkgs = ("mlflow", "torch", "numpy", "pyyaml", "pydantic", "scipy", "opencv-python-headless", "pyarrow")
    return [f"{pkg}=={version(pkg)}" for pkg in pkgs]


def signature(input_size: tuple[int, int], embedding_size: int, uncertainty_size: int | None = None) -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    h, w = input_size
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, 3, h, w), "images")])
    outputs = [TensorSpec(np.dtype(np.float32), (-1, embedding_size), "embedding")]
    if uncertainty_size is not None:
        outputs.append(TensorSpec(np.dtype(np.float32), (-1, uncertainty_size), "uncertainty"))
    params = ParamSchema([ParamSpec("align", "boolean", False), ParamSpec("min_score", "double", 0.6)])
    sig = ModelSignature(inputs=inputs, outputs=Schema(outputs), params=params)
    # encoded images are taken too, which no schema can state beside a tensor: MLflow then hands the
    # input over as sent (its path for type-hinted models); `pyfunc_predict` checks it instead
    sig._is_signature_from_type_hint = True
    return sig


def log_and_register(
    tracking: TrackingConfig,
    run_id: str,
    stage: str,
    bundle_dir: str | os.PathLike,
    metrics: dict[str, float],
    head_dir: str | os.PathLike | None = None,
    uncertainty_size: int | None = None,
    detector_model: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Log the model into `run_id`, register it under the stage's name, set aliases.

    The YuNet model (`detector_model`, else the run's `align.detector_model`) goes along, so the pyfunc
    can align photos; the operating point on the run's pair tables goes into the version's tags.
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
    detector = detector_model or _run_setting(run_id, "align", "detector_model")
    if detector and Path(detector).is_file():
        artifacts["detector"] = str(detector)
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
    metric_name = champion_metric(tracking, stage)
    value = metrics.get(metric_name)
    # the metric the champion decision reads (the rest stay on the run: one request per tag)
    if isinstance(value, int | float):
        mlc.set_model_version_tag(name, version, METRIC_TAG + metric_name, str(float(value)))
    run = mlc.get_run(run_id)
    for key in ("git.commit", "data.manifest_sha256", "data.dvc_md5", "config.yaml_sha256"):
        if key in run.data.tags:
            mlc.set_model_version_tag(name, version, key, run.data.tags[key])
    from facepipe.models.operating import registration_point

    for key, val in registration_point(bundle_dir, head_dir, run.data.tags.get("data.path")).items():
        mlc.set_model_version_tag(name, version, key, val)
    champion = promote(tracking, name, version, value)
    return {
        "name": name,
        "version": version,
        "uri": f"models:/{name}/{version}",
        "champion": champion,
        "metric": value,
        "metric_name": metric_name,
    }


def _run_setting(run_id: str, section: str, key: str) -> Any:
    """A setting from the config the run logged (`config/params.yaml`), or None."""
    import mlflow

    try:
        config = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/config/params.yaml")) or {}
    except Exception:  # noqa: BLE001 - no logged config: the setting is unknown
        return None
    return (config.get(section) or {}).get(key)


def operating_point_tags(uri: str, tracking: TrackingConfig) -> dict[str, str]:
    """The operating-point tags of the version a `models:/name@alias` or `models:/name/version` names."""
    from facepipe.models.operating import version_point_tags

    return version_point_tags(client(tracking), uri)


def promote(tracking: TrackingConfig, name: str, version: str, value: float | None) -> bool:
    """Give `version` the alias `challenger`; also `champion` if it beats the champion on the model's
    champion metric (`champion_metric`: higher or lower is better as `facepipe.eval.metrics` says)."""
    from mlflow.exceptions import MlflowException

    mlc = client(tracking)
    metric_name = champion_metric(tracking, name)
    mlc.set_registered_model_alias(name, CHALLENGER, version)
    try:
        current = mlc.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    best = None
    if current is not None:
        raw = current.tags.get(METRIC_TAG + metric_name)
        best = float(raw) if raw is not None else None
    wins = current is None or is_better(metric_name, value, best)
    if wins:
        mlc.set_registered_model_alias(name, CHAMPION, version)
        log.info("%s version %s is the new champion (%s=%s, was %s)", name, version, metric_name, value, best)
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
