"""Stage 1: train a backbone with a margin head on Ray Train (DDP), tracked and registered in MLflow.

`train_backbone(config)` is the Python API behind `facepipe train backbone`; it follows the one stage
driver (`facepipe.train.stage`) and its workers run `BackboneLoop` on the one loop
(`facepipe.train.loop`). What is particular to this stage:

* batches stream from each worker's disjoint part of the shards (`ShardLoader`, uint8 NHWC, normalised
  on the device by the loop's `place`);
* backbone + margin head train as one DDP module; above `partial_fc_threshold` classes the class
  centres are sharded across workers (PartialFC), each rank checkpointing its own slice;
* the learning rate also anneals against `max_minutes`, autocast runs the backbone on GPU;
* after every epoch (and at the end) all ranks run 10-fold verification on the pair tables;
* the driver joins PartialFC's centre slices into the bundle and logs training/ROC plots.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from facepipe import tracking
from facepipe.config import Config
from facepipe.data.loader import ShardLoader
from facepipe.fsutil import torch_save_atomic
from facepipe.models.bundle import CENTRES_FILE, BundleInfo, save_bundle
from facepipe.train.collective import gather_objects
from facepipe.train.features import merge_verification, verify_pairs
from facepipe.train.loop import StageLoop
from facepipe.train.plots import write_plots
from facepipe.train.ray_job import TrainOutcome
from facepipe.train.stage import DataInfo, StageDriver, StageResult


def margin_head_kwargs(name: str, s: float | None, m: float | None, extra: dict[str, Any]) -> dict[str, Any]:
    """s and m for heads whose constructor takes them (None: the head's own default), then extras."""
    from facepipe.models.registry import MARGIN_HEADS

    factory = MARGIN_HEADS.get(name)
    target = getattr(factory, "func", factory)
    accepted = set(inspect.signature(target).parameters) if target is not None else set()
    kwargs = {k: v for k, v in (("s", s), ("m", m)) if k in accepted and v is not None}
    kwargs.update(extra)
    return kwargs


def _objective_module(backbone: Any, head: Any) -> Any:
    """backbone → embeddings → margin-head loss as one module, so DDP can wrap the pair."""
    from torch import nn

    class Objective(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = head

        def forward(self, images: Any, labels: Any, amp: bool = False) -> Any:
            import torch

            with torch.autocast(images.device.type, enabled=amp):
                emb = self.backbone(images)
            if hasattr(self.head, "loss"):  # a margin head owning all centres
                return self.head.loss(emb.float(), labels)
            return self.head(emb.float(), labels)  # PartialFC: sharded centres, distributed loss

    return Objective()


class BackboneLoop(StageLoop):
    section = "train_backbone"

    def setup(self) -> None:
        import ray.train.torch
        import torch

        from facepipe.models.registry import build_backbone, build_margin_head  # lazy: torch

        tb = self.settings
        self.data = DataInfo(**self.cfg["data"])
        self.checkpoint_every, self.log_every = tb.checkpoint_every_steps, tb.log_every_steps
        self.budget_s = tb.max_minutes * 60 if tb.max_minutes is not None else None
        self.amp_requested = tb.amp
        self.input_size = tuple(tb.backbone.input_size)
        self.backbone_kwargs = {
            "embedding_size": tb.backbone.embedding_size,
            "input_size": list(self.input_size),
            **tb.backbone.extra,
        }
        backbone = build_backbone(tb.backbone.name, **self.backbone_kwargs)
        head_kwargs = margin_head_kwargs(tb.margin.name, tb.margin.s, tb.margin.m, tb.margin.extra)
        self.partial_fc = self.data.num_classes > tb.partial_fc_threshold
        sizes = {"embedding_size": backbone.embedding_size, "num_classes": self.data.num_classes}
        if self.partial_fc:
            from facepipe.models.partial_fc import PartialFC

            margin = build_margin_head(tb.margin.name, **head_kwargs)
            head = PartialFC(
                margin, **sizes, sample_rate=tb.partial_fc_sample_rate, rank=self.rank, world_size=self.world
            )
        else:
            head = build_margin_head(tb.margin.name, **sizes, **head_kwargs)
        self.margin_s = float((margin if self.partial_fc else head).s)  # the scale in effect, default or set
        # NHWC: oneDNN's convolutions with few channels run several times faster than NCHW on CPU
        self.memory_format = torch.channels_last if tb.channels_last else torch.contiguous_format
        self.input_memory_format = self.memory_format
        self.backbone = backbone.to(memory_format=self.memory_format)
        self.model = _objective_module(self.backbone, head)
        if self.partial_fc:
            # the backbone is data-parallel; the sharded centres are not (each rank owns its own slice)
            self.model.backbone = ray.train.torch.prepare_model(self.backbone)
            head.to(self.device)
        else:
            self.model = ray.train.torch.prepare_model(self.model)
        self.loader = ShardLoader(
            self.data.shards,
            tb.batch_size,
            self.input_size,
            self.data.color_order,
            self.rank,
            self.world,
            seed=tb.seed,
            flip=tb.loader.flip,
            workers=tb.loader.workers,
            mode=tb.loader.mode,
            prefetch=tb.loader.prefetch,
            window_rows=tb.loader.window_rows,
        )
        self.plan_training(self.model.parameters(), len(self.loader))

    def batches(self, epoch: int, first: int) -> Iterator[tuple[int, tuple[Any, ...]]]:
        for batch in self.loader.epoch(epoch, start_batch=first):
            yield batch.index, (batch.images, batch.labels)

    def train_step(self, batch: tuple[Any, ...]) -> tuple[Any, dict[str, Any]]:
        return self.model(*batch, self.amp), {}

    def close(self) -> None:
        if hasattr(self, "loader"):
            self.loader.close()

    def model_state(self) -> dict[str, Any]:
        state = self.inner.state_dict()
        if self.partial_fc:  # each rank saves its own slice of the centres
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        return state

    def restore(self, state: dict[str, Any], directory: Path) -> None:
        import torch

        if self.partial_fc:
            shard = torch.load(directory / f"centres-rank{self.rank}.pt", weights_only=True)
            state["model"].update({f"head.{k}": v for k, v in shard.items()})

    def save_artifacts(self, directory: Path, final: bool) -> None:
        import torch

        tb = self.settings
        if self.rank == 0 and (final or not self.partial_fc):
            centres = None if self.partial_fc else self.inner.head.weight
            info = BundleInfo(
                tb.backbone.name,
                self.backbone_kwargs,
                self.backbone.embedding_size,
                self.input_size,
                self.data.color_order,
                self.data.num_classes,
                tb.margin.name,
                {"margin_s": self.margin_s, "step": self.step},
            )
            save_bundle(directory / "bundle", self.backbone, info, centres)
        if self.partial_fc:
            head = {k[len("head.") :]: v for k, v in self.inner.state_dict().items() if k.startswith("head.")}
            torch.save(head, directory / f"centres-rank{self.rank}.pt")

    def verify(self) -> dict[str, float]:
        # every rank verifies its share of the pair tables (a rank idles in the next step's collective
        # otherwise); rank 0 gathers the parts
        part = verify_pairs(
            self.backbone,
            self.data.shards_dir,
            self.input_size,
            self.data.color_order,
            self.config.eval.folds,
            clean_accuracy=True,
            flip=self.settings.verify_flip,
            rank=self.rank,
            world=self.world,
        )
        return merge_verification(gather_objects(part))

    def epoch_metrics(self) -> dict[str, Any]:
        return self.verify() if self.settings.verify_every_epoch else {}

    def final_metrics(self) -> dict[str, Any]:
        return self.verify()


def assemble_centres(checkpoint_dir: Path, bundle: Path) -> None:
    """Join PartialFC's per-rank centre shards (contiguous class blocks, rank order) into the bundle."""
    import torch

    shards = sorted(checkpoint_dir.glob("centres-rank*.pt"), key=lambda p: int(p.stem.split("rank")[1]))
    if not shards or (bundle / CENTRES_FILE).is_file():
        return
    weights = [torch.load(p, map_location="cpu", weights_only=True)["weight"] for p in shards]
    torch_save_atomic(torch.cat(weights).float(), bundle / CENTRES_FILE)


class BackboneStage(StageDriver):
    title, kind, job_type, register_as = "facepipe train backbone", "backbone", "train_backbone", "backbone"

    def scaling(self) -> Any:
        return self.config.train_backbone.scaling

    def entry(self) -> Any:
        return BackboneLoop.entry

    def stage_config(self) -> dict[str, Any]:
        return {"data": self.data.to_dict()}

    def evaluate(self, outcome: TrainOutcome, run_id: str | None) -> StageResult:
        # the loop verified the final model; its metrics arrive with the final checkpoint
        bundle = Path(outcome.checkpoint_path) / "bundle"
        assemble_centres(Path(outcome.checkpoint_path), bundle)
        metrics = {k: v for k, v in outcome.metrics.items() if isinstance(v, int | float)}
        return StageResult(run_id, bundle, metrics)

    def log_results(self, result: StageResult, outcome: TrainOutcome) -> None:
        plots = write_plots(
            self.config, result.run_id, result.bundle_dir, self.data, Path(outcome.run_path) / "plots"
        )
        tracking.log_artifacts(self.config.tracking, result.run_id, plots, "plots")


def train_backbone(
    config: Config, shards_dir: str | os.PathLike | None = None, **options: Any
) -> StageResult:
    """Train the backbone stage on Ray Train; returns the bundle, final metrics and registered version.

    `options`: `run_name` (reused: resumes that run from its latest checkpoint), `register`,
    `events_path`, `track`, as `StageDriver` takes them.
    """
    return BackboneStage(config, shards_dir, **options).run()
