"""Typed configuration: one tree loaded from `params.yaml`, overridable from the command line.

The same file drives the CLI, the Prefect flows and the DVC stages, so a parameter has exactly one
home. Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from facepipe.errors import FacepipeError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(Section):
    """Where each stage reads and writes, relative to the working directory."""

    raw: str = "data/raw"  # the InsightFace-layout dataset (DVC-tracked)
    shards: str = "data/shards"  # decoded Parquet shards + pair tables
    aligned: str = "data/aligned"  # aligned shards from image folders
    runs: str = "runs"  # Ray Train storage_path: checkpoints and results
    features: str = "data/features"  # cached frozen-backbone features
    reports: str = "reports"  # evaluation JSON + PNG plots


class SynthConfig(Section):
    identities: int = 1000
    images_per_identity: int = 15
    pairs: int = 3000
    seed: int = 0
    size: int = 112
    workers: int = 2
    # template (IJB layout) and video (YTF layout) sets beside the pair tables: "ijb,video", or "" for none
    protocols: str = "ijb,video"
    protocol_subjects: int = 20  # identities in each protocol set


class DecodeConfig(Section):
    target_mb: int = 256
    workers: int = 2
    validate_images: bool = False
    skip_bad: bool = False
    color_order: Literal["RGB", "BGR"] = "RGB"
    source_hash: Literal["xxh3_128", "sha256"] = "xxh3_128"  # source files' digest in the manifest


class AlignConfig(Section):
    template: Literal["arcface", "sphereface", "probface"] = "arcface"
    detector_model: str | None = None
    min_score: float = 0.6
    workers: int = 2


class MarginConfig(Section):
    """The margin head; an unset s / m is the chosen head's own default (its paper's values).

    One shared `m` used to reach every head, so A-Softmax silently trained with CosFace's 0.35. Now the
    order is: explicit `s` / `m` > `heads[name]` (settings kept for one head only) > the head's default.
    """

    name: str = "cosface"
    s: float | None = None
    m: float | None = None
    heads: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per head: {s, m, …} used only for it
    extra: dict[str, Any] = Field(default_factory=dict)  # head-specific keyword arguments

    @model_validator(mode="before")
    @classmethod
    def _head_settings(cls, data: Any) -> Any:
        # the chosen head's own entry fills s / m unless set explicitly (None counts as unset); its other
        # keys join `extra`, where an explicit key wins too
        if not isinstance(data, dict):
            return data
        chosen = dict((data.get("heads") or {}).get(data.get("name", "cosface")) or {})
        own = {k: chosen.pop(k) for k in ("s", "m") if k in chosen}
        filled = {k: v for k, v in own.items() if data.get(k) is None}
        return {**data, **filled, "extra": {**chosen, **(data.get("extra") or {})}}


class BackboneConfig(Section):
    # the CPU default: full 112×112 crops through a stride-2 stem cost about what 56×56 ones do with
    # iresnet_tiny, and keep the fine detail (eyes, brows) that tells relatives apart
    name: str = "iresnet_tiny_s2"
    embedding_size: int = 128
    input_size: tuple[int, int] = (112, 112)
    extra: dict[str, Any] = Field(default_factory=dict)  # backbone-specific keyword arguments


class ScalingConfig(Section):
    """Ray Train scaling and cluster address (a flow parameter on a cluster)."""

    address: str | None = None  # None: start/attach a local Ray; "auto" or ray://host:10001 on a cluster
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Ray's placement of the workers' bundles: PACK fills one node first (fast collectives); SPREAD
    # puts them on different nodes where it can (and still runs when fewer nodes are left)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class OptimConfig(Section):
    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = 2e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 0.5
    poly_power: float = 2.0
    grad_clip: float = 5.0


class LoaderConfig(Section):
    """The training input pipeline (facepipe.data.loader)."""

    workers: int = 2  # decoding threads/processes per training worker
    mode: Literal["thread", "process"] = "thread"
    prefetch: int = 4  # decoded batches kept ready
    window_rows: int = 8192  # block-shuffle window (shards are label-sorted)
    flip: bool = True


class TrainBackboneConfig(Section):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    margin: MarginConfig = Field(default_factory=MarginConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    epochs: int = 8
    batch_size: int = 128  # per worker
    max_minutes: float | None = None  # wall-clock cap for CPU demos
    amp: bool = True  # only takes effect on GPU
    channels_last: bool = True  # NHWC tensors (faster convolutions on CPU and with AMP on GPU)
    partial_fc_threshold: int = 50_000  # class count above which PartialFC shards the centres
    partial_fc_sample_rate: float = 0.3
    checkpoint_every_steps: int = 200
    max_failures: int = 2
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimiser steps (tests, smoke runs)
    log_every_steps: int = 10  # per-step metrics to MLflow
    verify_every_epoch: bool = True  # 10-fold verification on the pair tables after each epoch
    # training-time verification embeds each image once (`facepipe evaluate` adds the mirror): on CPU the
    # mirror doubles a cost that is taken out of the training budget every epoch
    verify_flip: bool = False
    loader: LoaderConfig = Field(default_factory=LoaderConfig)


class FinetuneConfig(Section):
    """Triplet fine-tuning of a trained backbone with the centre term (video model, seed 003)."""

    backbone_uri: str = "models:/facepipe-backbone@champion"
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_epochs=0.0))
    scaling: ScalingConfig = Field(default_factory=lambda: ScalingConfig(num_workers=1))
    epochs: int = 2
    classes_per_batch: int = 16  # P
    images_per_class: int = 4  # K
    triplet_margin: float = 0.2  # on squared L2 distance of unit embeddings
    centre_weight: float = 0.01  # λ_c of the centre term, times the margin head's scale s
    hardest: bool = True  # batch-hard mining; False: all semi-hard triplets
    max_steps: int | None = None
    seed: int = 0


class TrainUncertaintyConfig(Section):
    method: str = "probface"  # a name of facepipe.uncertainty.registry, which the head stage checks
    backbone_uri: str = "models:/facepipe-backbone@champion"
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_epochs=0.0))
    scaling: ScalingConfig = Field(default_factory=lambda: ScalingConfig(num_workers=1))
    epochs: int = 6
    classes_per_batch: int = 32  # P in the P x K batches of PFE/ProbFace
    images_per_class: int = 4  # K
    batch_size: int = 256  # SCF's plain batches
    cache_features: bool = True
    extra: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    max_steps: int | None = None


class EvalConfig(Section):
    rejection_rates: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3])
    far_targets: list[float] = Field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    folds: int = 10
    flip: bool = True
    batch_size: int = 256
    # ISO/IEC 29794-1 EDC (facepipe.eval.edc): threshold at each FMR target, pAUC up to the discard
    # limit, curves reported/plotted up to edc_discard_max
    edc_fmr_targets: list[float] = Field(default_factory=lambda: [1e-3, 1e-4])
    edc_discard_limit: float = Field(0.2, gt=0.0, le=1.0)
    edc_discard_max: float = Field(0.5, gt=0.0, le=1.0)
    # what a discard fraction is a fraction of: all comparisons, or (ISO FNMR-EDC) the mated ones
    edc_population: Literal["all", "mated"] = "all"


class TrackingConfig(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "facepipe"
    # metric used to decide whether a new version takes the `champion` alias (higher is better)
    champion_metric: str = "accuracy"
    artifact_location: str | None = None  # None: MLflow's default (./mlruns); a folder or s3:// URI


class Config(Section):
    seed: int = 0
    paths: PathsConfig = Field(default_factory=PathsConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    train_backbone: TrainBackboneConfig = Field(default_factory=TrainBackboneConfig)
    train_uncertainty: TrainUncertaintyConfig = Field(default_factory=TrainUncertaintyConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


DEFAULT_PARAMS = "params.yaml"


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load `params.yaml` (or `path`), then apply `a.b.c=value` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is None and Path(DEFAULT_PARAMS).is_file():
        path = DEFAULT_PARAMS
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise FacepipeError(f"cannot read configuration {path}: {err}") from err
        if not isinstance(data, dict):
            raise FacepipeError(f"configuration {path} must be a mapping at the top level")
    for item in overrides or []:
        _apply_override(data, item)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise FacepipeError(f"invalid configuration{f' in {path}' if path else ''}:\n{err}") from err


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise FacepipeError(f"override {item!r} must look like section.key=value")
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FacepipeError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def dump_config(config: Config) -> str:
    """The configuration as YAML, for logging to MLflow and writing params.yaml."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(config: Config) -> dict[str, Any]:
    """`section.key -> value` pairs, the shape MLflow params want."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", config.model_dump(mode="json"))
    return out
