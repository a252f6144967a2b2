"""Training flows: `train-backbone`, and `train-pfe` / `train-probface` / `train-scf`.

An uncertainty flow resolves the backbone alias to a fixed version first (so a retry trains against
the same backbone even if the alias moves meanwhile), trains the head on the frozen backbone,
benchmarks the new version and reports where the registry put it (`challenger`, or `champion` when it
beat the current one). The Ray address and scaling are flow parameters.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from facepipe.tracking import model_name
from facepipe.uncertainty.registry import method_names
from flows.evaluate import benchmark
from flows.stages import FlowSettings, publish_links, registered_model, run_name, run_stage, scaling_overrides


def backbone_argv(s: FlowSettings, data: str, name: str) -> list[str]:
    return ["train", "backbone", "--shards", data, "--name", name, *s.config_args()]


def head_argv(s: FlowSettings, method: str, backbone_uri: str, data: str, name: str) -> list[str]:
    return [
        "train", "uncertainty", "--method", method, "--backbone", backbone_uri, "--shards", data,
        "--name", name, *s.config_args(),
    ]  # fmt: skip


def _run_ids(stage: dict[str, Any]) -> list[str]:
    return [r["run_id"] for r in stage.get("mlflow_runs", [])]


@flow(name="train-backbone", retries=1, retry_delay_seconds=10, log_prints=True)
def train_backbone(
    workdir: str = ".",
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    data: str | None = None,
    ray_address: str | None = None,
    num_workers: int | None = None,
    use_gpu: bool | None = None,
) -> dict[str, Any]:
    """Train the backbone on Ray Train; returns {model (name, version, aliases), stage}."""
    s = FlowSettings(workdir, params, [*(overrides or []), *scaling_overrides(
        "train_backbone", ray_address, num_workers, use_gpu)])  # fmt: skip
    data = data or s.config.paths.shards
    stage_params = {"train_backbone": s.section("train_backbone"), "seed": s.config.seed}
    stage = run_stage(
        "train-backbone",
        backbone_argv(s, data, run_name("backbone", stage_params, [data], s.workdir)),
        s.workdir,
        deps=[data],
        params=stage_params,
        env=s.ray_env(ray_address),
        **s.tracking,
    )
    model = registered_model(
        s.config.tracking.tracking_uri, s.workdir, model_name("backbone"), run_ids=_run_ids(stage)
    )
    publish_links("train-backbone", "train-backbone: MLflow runs", [stage], {"registered": model})
    return {"model": model, "stage": stage}


def train_head(
    method: str,
    workdir: str,
    params: str,
    overrides: list[str] | None,
    data: str | None,
    backbone_alias: str,
    ray_address: str | None,
    num_workers: int | None,
    use_gpu: bool | None,
    run_benchmark: bool,
) -> dict[str, Any]:
    """Frozen backbone (by alias) → head → benchmark → registered version with its aliases."""
    s = FlowSettings(workdir, params, [
        f"train_uncertainty.method={method}", *(overrides or []),
        *scaling_overrides("train_uncertainty", ray_address, num_workers, use_gpu),
    ])  # fmt: skip
    data = data or s.config.paths.shards
    tracking_uri = s.config.tracking.tracking_uri
    backbone = registered_model(tracking_uri, s.workdir, model_name("backbone"), alias=backbone_alias)
    stage_params = {"train_uncertainty": s.section("train_uncertainty"), "backbone": backbone["uri"]}
    stage = run_stage(
        f"train-{method}",
        head_argv(s, method, backbone["uri"], data, run_name(method, stage_params, [data], s.workdir)),
        s.workdir,
        deps=[data],
        params=stage_params,
        env=s.ray_env(ray_address),
        **s.tracking,
    )
    model = registered_model(tracking_uri, s.workdir, model_name(method), run_ids=_run_ids(stage))
    report = None
    if run_benchmark:
        report = benchmark(
            workdir=s.workdir, params=s.params, overrides=s.overrides, models=[model["uri"]], data=data
        )
    # the benchmark may have moved `champion`: report the aliases as they stand now
    model = registered_model(tracking_uri, s.workdir, model_name(method), version=model["version"])
    publish_links(
        f"train-{method}",
        f"train-{method}: MLflow runs",
        [stage],
        {"backbone": backbone["uri"], "registered": model},
    )
    return {"method": method, "backbone": backbone, "model": model, "benchmark": report, "stage": stage}


def _head_flow(method: str):
    def train(
        workdir: str = ".",
        params: str = "params.yaml",
        overrides: list[str] | None = None,
        data: str | None = None,
        backbone_alias: str = "champion",
        ray_address: str | None = None,
        num_workers: int | None = None,
        use_gpu: bool | None = None,
        run_benchmark: bool = True,
    ) -> dict[str, Any]:
        return train_head(
            method,
            workdir,
            params,
            overrides,
            data,
            backbone_alias,
            ray_address,
            num_workers,
            use_gpu,
            run_benchmark,
        )

    train.__name__ = f"train_{method}"
    train.__doc__ = f"Train the {method} uncertainty head on the frozen backbone `facepipe-backbone@<alias>`."
    return flow(name=f"train-{method}", retries=1, retry_delay_seconds=10, log_prints=True)(train)


# one flow per registered method; prefect.yaml names them by these module attributes
HEAD_FLOWS = {method: _head_flow(method) for method in method_names()}
train_pfe, train_probface, train_scf = HEAD_FLOWS["pfe"], HEAD_FLOWS["probface"], HEAD_FLOWS["scf"]
