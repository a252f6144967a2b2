"""Training flows: `train-backbone`, one `train-<method>` per uncertainty method (PFE, ProbFace, SCF,
DUL), and `train-finetune` (the video model's second stage: triplets + the centre term).

An uncertainty flow resolves the backbone alias to a fixed version first (so a retry trains against
the same backbone even if the alias moves meanwhile), trains the head on the frozen backbone,
benchmarks the new version and reports where the registry put it (`challenger`, or `champion` when it
beat the current one). The Ray address and scaling are flow parameters.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from facepipe.orchestration.settings import FlowSettings, scaling_overrides
from facepipe.orchestration.stage_cache import run_name
from facepipe.tracking import model_name
from facepipe.uncertainty.registry import method_names
from flows.evaluate import benchmark
from flows.stages import publish_links, registered_model, run_stage


def backbone_argv(s: FlowSettings, data: str, name: str) -> list[str]:
    return ["train", "backbone", "--shards", data, "--name", name, *s.config_args()]


def head_argv(s: FlowSettings, method: str, backbone_uri: str, data: str, name: str) -> list[str]:
    return [
        "train", "uncertainty", "--method", method, "--backbone", backbone_uri, "--shards", data,
        "--name", name, *s.config_args(),
    ]  # fmt: skip


def finetune_argv(s: FlowSettings, backbone_uri: str, data: str, name: str) -> list[str]:
    argv = ["train", "finetune", "--backbone", backbone_uri, "--shards", data, "--name", name]
    return [*argv, *s.config_args()]


def _run_ids(stage: dict[str, Any]) -> list[str]:
    return [r["run_id"] for r in stage.get("mlflow_runs", [])]


def _backbone(tracking_uri: str, workdir: str, alias: str, version: str | None) -> dict[str, Any]:
    """The backbone version a stage builds on: `version` when given (the pipeline pins the one it just
    trained, so a rerun finds every later stage up to date), else whatever `alias` names now."""
    name = model_name("backbone")
    if version:
        return registered_model(tracking_uri, workdir, name, version=version)
    return registered_model(tracking_uri, workdir, name, alias=alias)


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


def train_on_backbone(
    stage: str,
    workdir: str,
    params: str,
    overrides: list[str] | None,
    data: str | None,
    backbone_alias: str,
    ray_address: str | None,
    num_workers: int | None,
    use_gpu: bool | None,
    run_benchmark: bool,
    backbone_version: str | None = None,
) -> dict[str, Any]:
    """A stage on a trained backbone (a fixed version, else by alias): `stage` is an uncertainty method
    (a head on the frozen backbone, registered as `facepipe-<method>`) or "finetune" (triplets + the
    centre term, registered as a new `facepipe-backbone` version and benchmarked beside the one it
    started from, so the benchmark gives `champion` to the better). Then benchmark, and report where
    the registry put the new version."""
    head = stage != "finetune"
    section = "train_uncertainty" if head else "finetune"
    s = FlowSettings(workdir, params, [
        *([f"train_uncertainty.method={stage}"] if head else []), *(overrides or []),
        *scaling_overrides(section, ray_address, num_workers, use_gpu),
    ])  # fmt: skip
    data = data or s.config.paths.shards
    tracking_uri = s.config.tracking.tracking_uri
    backbone = _backbone(tracking_uri, s.workdir, backbone_alias, backbone_version)
    stage_params = {section: s.section(section), "backbone": backbone["uri"]}
    name = run_name(stage, stage_params, [data], s.workdir)
    if head:
        argv = head_argv(s, stage, backbone["uri"], data, name)
    else:
        argv = finetune_argv(s, backbone["uri"], data, name)
    ran = run_stage(
        f"train-{stage}", argv, s.workdir, deps=[data], params=stage_params, env=s.ray_env(ray_address),
        **s.tracking,
    )  # fmt: skip
    registered_as = model_name(stage if head else "backbone")
    model = registered_model(tracking_uri, s.workdir, registered_as, run_ids=_run_ids(ran))
    report = None
    if run_benchmark:
        uris = list(dict.fromkeys([model["uri"], *([] if head else [backbone["uri"]])]))
        report = benchmark(workdir=s.workdir, params=s.params, overrides=s.overrides, models=uris, data=data)
    # the benchmark may have moved `champion`: report the aliases as they stand now
    model = registered_model(tracking_uri, s.workdir, registered_as, version=model["version"])
    links = {"backbone": backbone["uri"], "registered": model}
    publish_links(f"train-{stage}", f"train-{stage}: MLflow runs", [ran], links)
    return {"method": stage, "backbone": backbone, "model": model, "benchmark": report, "stage": ran}


def _stage_flow(stage: str, doc: str):
    """The Prefect flow `train-<stage>` (module attribute `train_<stage>`, which prefect.yaml names)."""

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
        backbone_version: str | None = None,
    ) -> dict[str, Any]:
        return train_on_backbone(
            stage, workdir, params, overrides, data, backbone_alias, ray_address, num_workers, use_gpu,
            run_benchmark, backbone_version,
        )  # fmt: skip

    train.__name__, train.__doc__ = f"train_{stage}", doc
    return flow(name=f"train-{stage}", retries=1, retry_delay_seconds=10, log_prints=True)(train)


# one flow per registered method, and fine-tuning; prefect.yaml names them by these module attributes
HEAD_FLOWS = {
    method: _stage_flow(
        method, f"Train the {method} head on the frozen backbone `facepipe-backbone@<alias>`."
    )
    for method in method_names()
}
train_pfe, train_probface, train_scf = HEAD_FLOWS["pfe"], HEAD_FLOWS["probface"], HEAD_FLOWS["scf"]
train_dul = HEAD_FLOWS["dul"]
train_finetune = _stage_flow(
    "finetune",
    "Fine-tune `facepipe-backbone@<alias>` with triplets and the centre term (the video model's second "
    "stage); registers a new backbone version, benchmarked beside the one it started from.",
)
