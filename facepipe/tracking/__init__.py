"""MLflow tracking and model registry: runs, metrics, model versions, `challenger`/`champion` aliases.

The driver opens a run (params, config, data and code version tags) and hands its id to Ray Train's
rank-0 worker, which logs per-step and per-epoch metrics into it through `MetricLogger`. At the end the
driver logs the plots and the trained model as a pyfunc (explicit signature and pip requirements, so
nothing is inferred: inference costs ~14 s and guesses), registers it, gives the new version the
alias `challenger`, and moves `champion` to it when it beats the current champion on the model's
champion metric (`champion_metric`: `tracking.champion_metric` for backbones, verification accuracy,
higher is better; `tracking.head_champion_metric` for uncertainty heads, EDC pAUC, lower is better;
names and directions in `facepipe.eval.metrics`).

A registered model holds a backbone bundle (see `facepipe.models.bundle`) and, for the uncertainty
stages, the head's weights: `models:/<name>@champion` loads back as a pyfunc returning the same
embeddings (and uncertainties), and `download_model` gives the stages the bundle itself.
"""

from __future__ import annotations

from facepipe.tracking.registry import (
    download_model,
    load_model,
    log_and_register,
    operating_point_tags,
    pip_requirements,
    promote,
    resolve_bundle,
    signature,
)
from facepipe.tracking.runs import (
    BACKBONE_MODEL,
    CHALLENGER,
    CHAMPION,
    METRIC_TAG,
    MetricLogger,
    champion_metric,
    client,
    data_version,
    dvc_md5,
    end_run,
    experiment_id,
    git_commit,
    log_artifacts,
    log_metrics,
    model_name,
    model_names,
    start_run,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "BACKBONE_MODEL",
    "METRIC_TAG",
    "champion_metric",
    "model_name",
    "model_names",
    "git_commit",
    "dvc_md5",
    "data_version",
    "client",
    "experiment_id",
    "start_run",
    "MetricLogger",
    "log_metrics",
    "log_artifacts",
    "end_run",
    "pip_requirements",
    "signature",
    "log_and_register",
    "operating_point_tags",
    "promote",
    "download_model",
    "load_model",
    "resolve_bundle",
]
