"""Fine-tuning stage of the video model (seed 003): triplet loss + centre term, hard examples in-batch.

Starting from a trained backbone bundle (its margin head's class centres included), the backbone is
fine-tuned on P×K batches with

    L = triplet(hard-mined in the batch, on unit embeddings) + λ_c · s · mean(1 − cos θ_y)

where θ_y is the angle between an embedding and its class centre W_y (kept fixed: the centres define
where each class should sit; the triplet term then spreads classes apart and the centre term keeps
each one compact). Mining: `hardest` uses, for every anchor, its farthest positive and nearest
negative; otherwise every (anchor, positive) pair takes its semi-hard negative (the nearest negative
farther than the positive, else the nearest one).
The loop and the driver are the shared ones (`facepipe.train.loop`, `facepipe.train.stage`).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from facepipe import tracking
from facepipe.config import Config
from facepipe.data.loader import decode_rows, shard_units
from facepipe.errors import FacepipeError
from facepipe.models.bundle import load_bundle, save_bundle
from facepipe.train.features import verify_pairs
from facepipe.train.loop import StageLoop, UnitPlan
from facepipe.train.plots import loss_curve, roc_plot
from facepipe.train.ray_job import TrainOutcome, local_run_dir
from facepipe.train.spread import class_spread, plot_spread, spread_metrics
from facepipe.train.stage import StageDriver, StageResult


def pairwise_sq_dist(x: Any) -> Any:
    """Squared L2 distances between rows of unit vectors, (B, B), clamped at 0."""
    gram = x @ x.T
    sq = gram.diagonal()
    return (sq[:, None] - 2 * gram + sq[None, :]).clamp_min(0.0)


def triplet_loss(embeddings: Any, labels: Any, margin: float, hardest: bool = True) -> tuple[Any, dict]:
    """Hard-mined triplet loss on L2-normalised `embeddings`; returns (loss, terms)."""
    import torch
    import torch.nn.functional as F

    x = F.normalize(embeddings, dim=1)
    dist = pairwise_sq_dist(x)
    labels = labels.reshape(-1)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=x.device)
    pos_mask, neg_mask = same & ~eye, ~same
    if not pos_mask.any() or not neg_mask.any():
        raise FacepipeError("triplet loss needs at least two classes with two images each in the batch")
    big = dist.max().detach() + 1.0
    if hardest:
        d_ap = torch.where(pos_mask, dist, torch.zeros_like(dist)).max(dim=1).values
        d_an = torch.where(neg_mask, dist, big).min(dim=1).values
        valid = pos_mask.any(dim=1)
        losses = F.relu(d_ap - d_an + margin)[valid]
    else:
        a, p = torch.nonzero(pos_mask, as_tuple=True)
        d_ap = dist[a, p]
        neg = torch.where(neg_mask[a], dist[a], big)  # (pairs, B)
        farther = torch.where(neg > d_ap[:, None], neg, big)
        semi = farther.min(dim=1).values
        d_an = torch.where(semi < big, semi, neg.min(dim=1).values)
        losses = F.relu(d_ap - d_an + margin)
    loss = losses.mean()
    active = (losses > 0).float().mean()
    return loss, {"triplet": loss.detach(), "active_fraction": active.detach()}


def centre_loss(embeddings: Any, labels: Any, centres: Any, scale: float, weight: float) -> Any:
    """λ_c · s · mean(1 − cos θ_y) against fixed class centres (seed 003's centre term)."""
    import torch.nn.functional as F

    cos = (F.normalize(embeddings, dim=1) * F.normalize(centres[labels.reshape(-1)], dim=1)).sum(dim=1)
    return weight * scale * (1.0 - cos).mean()


class FinetuneLoop(StageLoop):
    section = "finetune"

    def setup(self) -> None:
        import ray.train.torch

        ft = self.settings
        backbone, self.info, centres = load_bundle(self.cfg["bundle"])
        if centres is None:
            raise FacepipeError("fine-tuning needs the class centres saved with the backbone")
        self.centres = centres.float().to(self.device)
        self.scale = float(self.info.extra.get("margin_s", self.config.train_backbone.margin.s))
        self.units = shard_units(self.cfg["image_shards"])
        pk = (ft.classes_per_batch, ft.images_per_class)
        self.plan = UnitPlan(self.units, ft.seed, self.rank, self.world, pk, 0)
        self.model = ray.train.torch.prepare_model(backbone)
        # one decode thread: the next batch is decoded while this one trains
        self.pool = cf.ThreadPoolExecutor(1, thread_name_prefix="facepipe-finetune-decode")
        self.plan_training(self.model.parameters(), self.plan.steps_per_epoch)

    def load(self, plan_batch: np.ndarray, flips: np.ndarray) -> tuple[Any, Any]:
        import torch

        units = self.units
        pieces = [
            (units[int(u)].path, units[int(u)].row_group, plan_batch[plan_batch[:, 0] == u, 1])
            for u in np.unique(plan_batch[:, 0])
        ]
        images, labels = decode_rows(pieces, flips, tuple(self.info.input_size), self.info.color_order)
        # uint8 NHWC: the loop's `place` normalises on the device (channels-last, as before)
        pin = self.device.type == "cuda"
        images, labels = torch.from_numpy(images), torch.from_numpy(labels)
        return (images.pin_memory(), labels.pin_memory()) if pin else (images, labels)

    def batches(self, epoch: int, first: int) -> Iterator[tuple[int, tuple[Any, ...]]]:
        plan = self.plan.epoch(epoch)
        rng = np.random.default_rng([self.settings.seed, epoch, self.rank])
        flips = [rng.random(len(b)) < 0.5 for b in plan]
        if first >= len(plan):
            return
        pending = self.pool.submit(self.load, plan[first], flips[first])
        for index in range(first, len(plan)):
            batch = pending.result()
            if index + 1 < len(plan):
                pending = self.pool.submit(self.load, plan[index + 1], flips[index + 1])
            yield index, batch

    def train_step(self, batch: tuple[Any, ...]) -> tuple[Any, dict[str, Any]]:
        ft = self.settings
        images, labels = batch
        emb = self.model(images)
        trip, terms = triplet_loss(emb, labels, ft.triplet_margin, ft.hardest)
        centre = centre_loss(emb, labels, self.centres, self.scale, ft.centre_weight)
        return trip + centre, {**terms, "centre": centre.detach()}  # logged as train/centre

    def save_artifacts(self, directory: Path, final: bool) -> None:
        if self.rank == 0 and final:
            save_bundle(directory / "bundle", self.inner, self.info, self.centres)

    def close(self) -> None:
        if hasattr(self, "pool"):
            self.pool.shutdown(wait=True, cancel_futures=True)


class FinetuneStage(StageDriver):
    title, kind, job_type, register_as = "facepipe train finetune", "finetune", "finetune", "backbone"

    def __init__(self, config: Config, backbone_uri: str | None, **options: Any) -> None:
        super().__init__(config, **options)
        self.bundle_dir = tracking.resolve_bundle(
            backbone_uri or config.finetune.backbone_uri,
            config.tracking,
            local_run_dir(config.paths.runs, self.name) / "start",
        )

    def scaling(self) -> Any:
        return self.config.finetune.scaling

    def entry(self) -> Any:
        return FinetuneLoop.entry

    def stage_config(self) -> dict[str, Any]:
        return {"bundle": str(Path(self.bundle_dir).resolve()), "image_shards": self.data.shards}

    def evaluate(self, outcome: TrainOutcome, run_id: str | None) -> StageResult:
        bundle = Path(outcome.checkpoint_path) / "bundle"
        backbone, info, _ = load_bundle(bundle)
        size, colour, folds = tuple(info.input_size), info.color_order, self.config.eval.folds
        metrics = verify_pairs(backbone, self.data.shards_dir, size, colour, folds)
        # what the centre term is for: each class's spread around its mean, before and after
        start, _, _ = load_bundle(self.bundle_dir)
        spread = {
            when: class_spread(model, self.data.shards_dir, size, colour)
            for when, model in (("before", start), ("after", backbone))
        }
        metrics.update(spread_metrics(spread["before"], spread["after"]))
        return StageResult(run_id, bundle, metrics, extra={"spread": spread})

    def log_results(self, result: StageResult, outcome: TrainOutcome) -> None:
        super().log_results(result, outcome)
        out_dir = Path(outcome.run_path) / "plots"
        plots = loss_curve(self.config, result.run_id, out_dir, "Fine-tuning loss (triplet + centre term)")
        plots += roc_plot(result.bundle_dir, self.data, out_dir, "Fine-tuned backbone ROC")
        spread = result.extra["spread"]
        plots.append(plot_spread(spread["before"], spread["after"], out_dir / "centre_spread.png"))
        tracking.log_artifacts(self.config.tracking, result.run_id, plots, "plots")


def finetune(
    config: Config,
    shards_dir: str | os.PathLike | None = None,
    backbone_uri: str | None = None,
    **options: Any,
) -> StageResult:
    """Fine-tune a backbone (triplet + centre term); registers it as a new `facepipe-backbone` version.

    `options`: `run_name`, `register`, `events_path`, `track`, as `StageDriver` takes them.
    """
    return FinetuneStage(config, backbone_uri, shards_dir=shards_dir, **options).run()
