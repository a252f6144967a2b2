"""Stage 2: train an uncertainty head (any method of `facepipe.uncertainty.registry`) on a frozen backbone.

The backbone comes from a model URI (`models:/facepipe-backbone@champion`) or a bundle/checkpoint path
and never trains. By default its outputs (embedding + final conv map) are computed once and cached as
shards (`facepipe.train.features.cache_features`), so the head trains without re-running the
backbone; with `cache_features: false` every batch is decoded and pushed through the backbone.

Everything method-specific comes from the method's registry entry, which travels to the workers as
it is (so a method registered at run time trains too): its batching (P classes × K images for pair
losses, plain batches otherwise, see `facepipe.data.sampling`), whether its loss needs the class
centres `w_c` saved with the backbone, its registered model name and its uncertainty width.
The loop and the driver are the shared ones (`facepipe.train.loop`, `facepipe.train.stage`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from facepipe import tracking
from facepipe.config import Config
from facepipe.data.loader import shard_units
from facepipe.errors import FacepipeError
from facepipe.models.bundle import load_bundle
from facepipe.train.feature_source import CachedFeatures, RecomputedFeatures, prepare_features
from facepipe.train.head_eval import evaluate_head
from facepipe.train.loop import WINDOW_ROWS, StageLoop, UnitPlan
from facepipe.train.plots import loss_curve, rejection_plot
from facepipe.train.ray_job import TrainOutcome, local_run_dir
from facepipe.train.stage import StageDriver, StageResult


def _tensor(x: Any) -> Any:
    import torch

    return x if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))


def head_loss(
    model: Any, method: Any, emb: Any, fmap: Any, labels: Any, class_weights: Any
) -> tuple[Any, dict[str, Any]]:
    """The method's loss for one batch of frozen backbone outputs (arrays or tensors); μ = unit embedding."""
    import torch.nn.functional as F

    mu = F.normalize(_tensor(emb).float(), dim=1)
    out = model(_tensor(fmap))
    kwargs = {"class_weights": class_weights} if class_weights is not None else {}
    return method.loss(mu, out, _tensor(labels), **kwargs)


class HeadLoop(StageLoop):
    section = "train_uncertainty"

    def setup(self) -> None:
        import ray.train.torch

        from facepipe.uncertainty.head_io import build_head_model  # lazy: torch

        tu, cfg = self.settings, self.cfg
        self.method = cfg["method"]  # the registry entry itself, not a name: the worker needs no registry
        map_shape = tuple(cfg["map_shape"])
        centres = None
        if cfg["cache_dir"]:
            units = shard_units(cfg["cache_shards"])
            self.source: Any = CachedFeatures(units, map_shape)
            if self.method.needs_class_centres:
                _, _, centres = load_bundle(cfg["bundle"])
        else:
            backbone, info, centres = load_bundle(cfg["bundle"])
            for p in backbone.parameters():
                p.requires_grad_(False)
            units = shard_units(cfg["image_shards"])
            self.source = RecomputedFeatures(units, backbone, tuple(info.input_size), info.color_order)
        pk = (tu.classes_per_batch, tu.images_per_class) if self.method.batching == "pk" else None
        self.plan = UnitPlan(units, tu.seed, self.rank, self.world, pk, tu.batch_size, cfg["window_rows"])
        self.class_weights = centres.float().to(self.device) if centres is not None else None
        model = build_head_model(self.method, map_shape, cfg["embedding_size"], tu.extra)
        self.model = ray.train.torch.prepare_model(model)
        self.plan_training(self.model.parameters(), self.plan.steps_per_epoch)

    def batches(self, epoch: int, first: int) -> Iterator[tuple[int, tuple[Any, ...]]]:
        plan = self.plan.epoch(epoch)
        for index in range(first, len(plan)):
            yield index, tuple(_tensor(a) for a in self.source.batch(plan[index]))

    def train_step(self, batch: tuple[Any, ...]) -> tuple[Any, dict[str, Any]]:
        return head_loss(self.model, self.method, *batch, self.class_weights)

    def save_artifacts(self, directory: Path, final: bool) -> None:
        from facepipe.uncertainty.head_io import save_head  # lazy: torch

        if self.rank == 0:
            save_head(directory / "head", self.inner, self.cfg["head_meta"])


class HeadStage(StageDriver):
    job_type, output_label = "train_uncertainty", "head"

    def __init__(self, config: Config, method: str | None, backbone_uri: str | None, **options: Any) -> None:
        from facepipe.uncertainty.registry import get_method

        tu = config.train_uncertainty
        try:
            self.spec = get_method(method or tu.method)
        except ValueError as err:
            raise FacepipeError(str(err)) from None
        self.kind = self.register_as = self.spec.name
        self.title = f"facepipe train uncertainty ({self.spec.name})"
        super().__init__(config, **options)
        self.bundle_dir = tracking.resolve_bundle(
            backbone_uri or tu.backbone_uri,
            config.tracking,
            local_run_dir(config.paths.runs, self.name) / "backbone",
        )
        _, _, centres = load_bundle(self.bundle_dir)
        if self.spec.needs_class_centres and centres is None:
            raise FacepipeError(
                f"{self.kind} needs the class centres saved by the backbone stage; {self.bundle_dir} has none"
            )
        data = self.data
        self.features = prepare_features(
            config, self.bundle_dir, data.shards, data.shards_dir, tu.cache_features
        )

    def scaling(self) -> Any:
        return self.config.train_uncertainty.scaling

    def entry(self) -> Any:
        return HeadLoop.entry

    def stage_config(self) -> dict[str, Any]:
        f = self.features
        head_meta = {
            "method": self.spec.name,
            "map_shape": list(f.map_shape),
            "embedding_size": f.embedding_size,
            "extra": self.config.train_uncertainty.extra,
        }
        return {
            "method": self.spec,
            "bundle": str(Path(self.bundle_dir).resolve()),
            "cache_dir": f.cache_dir,
            "cache_shards": f.cache_shards,
            "image_shards": self.data.shards,
            "map_shape": list(f.map_shape),
            "embedding_size": f.embedding_size,
            "head_meta": head_meta,
            "window_rows": WINDOW_ROWS,
        }

    def evaluate(self, outcome: TrainOutcome, run_id: str | None) -> StageResult:
        from facepipe.uncertainty.head_io import load_head  # lazy: torch

        head_dir = Path(outcome.checkpoint_path) / "head"
        backbone, info, _ = load_bundle(self.bundle_dir)
        report = Path(outcome.run_path) / "evaluation"  # the files `facepipe evaluate --model` writes
        metrics = evaluate_head(
            (backbone, info),
            load_head(head_dir),
            self.spec.name,
            self.data.shards_dir,
            self.config.eval,
            report,
        )
        metrics["epoch_seconds"] = float(outcome.metrics.get("epoch_seconds", 0.0))
        extra = {"head_dir": str(head_dir), "cache_dir": self.features.cache_dir}
        return StageResult(run_id, self.bundle_dir, metrics, extra=extra)

    def log_results(self, result: StageResult, outcome: TrainOutcome) -> None:
        super().log_results(result, outcome)
        out_dir = Path(outcome.run_path) / "plots"
        title = f"{self.spec.name} head training loss"
        plots = loss_curve(self.config, result.run_id, out_dir, title)
        plots += rejection_plot(result.metrics, out_dir, self.spec.name)
        tracking.log_artifacts(self.config.tracking, result.run_id, plots, "plots")

    def output(self, result: StageResult) -> Path:
        return Path(result.extra["head_dir"])

    def register_kwargs(self, result: StageResult) -> dict[str, Any]:
        size = self.spec.uncertainty_size(self.features.embedding_size)
        return {"head_dir": Path(result.extra["head_dir"]), "uncertainty_size": size}


def train_uncertainty(
    config: Config,
    shards_dir: str | os.PathLike | None = None,
    method: str | None = None,
    backbone_uri: str | None = None,
    **options: Any,
) -> StageResult:
    """Train an uncertainty head on a frozen backbone; returns a `StageResult` (`facepipe.train.stage`).

    `options`: `run_name`, `register`, `events_path`, `track`, as `StageDriver` takes them.
    """
    return HeadStage(config, method, backbone_uri, shards_dir=shards_dir, **options).run()
