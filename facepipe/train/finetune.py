"""Fine-tuning stage of the video model (seed 003): triplet loss + centre term, hard examples in-batch.

Starting from a trained backbone bundle (its margin head's class centres included), the backbone is
fine-tuned on P×K batches with

    L = triplet(hard-mined in the batch, on unit embeddings) + λ_c · s · mean(1 − cos θ_y)

where θ_y is the angle between an embedding and its class centre W_y (kept fixed: the centres define
where each class should sit; the triplet term then spreads classes apart and the centre term keeps
each one compact). Mining: `hardest` uses, for every anchor, its farthest positive and nearest
negative; otherwise every (anchor, positive) pair takes its semi-hard negative (the nearest negative
farther than the positive, else the nearest one).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from facepipe import tracking
from facepipe.config import Config
from facepipe.data.loader import decode_rows, normalise, shard_units
from facepipe.data.sampling import epoch_plan, unit_labels, windows
from facepipe.errors import FacepipeError
from facepipe.models.bundle import load_bundle, save_bundle
from facepipe.train import backbone as backbone_stage  # the shared stage pieces live there for now
from facepipe.train.checkpoint import load_training_state, save_training_state
from facepipe.train.features import verify_pairs
from facepipe.train.nonfinite import stop_on_nonfinite
from facepipe.train.ray_job import launch_stage, set_threads, worker_context


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


def finetune_worker(cfg: dict[str, Any]) -> None:
    import ray.train
    import torch

    set_threads()
    config = Config.model_validate(cfg["config"])
    ft = config.finetune
    rank, world, node = worker_context()
    events = backbone_stage.EventLog(cfg.get("events_path"))
    torch.manual_seed(ft.seed)
    backbone, info, centres = load_bundle(cfg["bundle"])
    if centres is None:
        raise FacepipeError("fine-tuning needs the class centres saved with the backbone")
    centres = centres.float()
    scale = float(info.extra.get("margin_s", config.train_backbone.margin.s))
    units = shard_units(cfg["image_shards"])
    labels = unit_labels(units)
    total_rows = sum(u.rows for u in units)
    groups = windows(units, min(8192, max(total_rows // (2 * world), 1)))
    pk = (ft.classes_per_batch, ft.images_per_class)
    steps_per_epoch = len(epoch_plan(labels, groups, 0, ft.seed, rank, world, pk, 0))
    if steps_per_epoch == 0:
        raise FacepipeError("the data gives no P×K batch per worker: lower classes_per_batch")
    total_steps = ft.epochs * steps_per_epoch
    if ft.max_steps:
        total_steps = min(total_steps, ft.max_steps)
    backbone.train()
    model = ray.train.torch.prepare_model(backbone)
    inner = getattr(model, "module", model)
    optimizer = backbone_stage.build_optimizer([p for p in model.parameters() if p.requires_grad], ft.optim)
    scheduler = backbone_stage.build_scheduler(
        optimizer, total_steps, int(ft.optim.warmup_epochs * steps_per_epoch), ft.optim.poly_power
    )
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state, meta = load_training_state(directory)
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(meta["step"])
    events.write(event="start", rank=rank, world=world, pid=os.getpid(), node=node, step=step)
    metrics_log = (
        tracking.MetricLogger(cfg.get("tracking_uri"), cfg.get("run_id"))
        if rank == 0
        else tracking.MetricLogger(None, None)
    )
    size, colour = tuple(info.input_size), info.color_order

    def load(plan_batch: np.ndarray, flips: np.ndarray) -> tuple[Any, Any]:
        pieces = [
            (units[int(u)].path, units[int(u)].row_group, plan_batch[plan_batch[:, 0] == u, 1])
            for u in np.unique(plan_batch[:, 0])
        ]
        images, lab = decode_rows(pieces, flips, size, colour)
        return normalise(images), torch.from_numpy(lab)

    last = float("nan")
    with cf.ThreadPoolExecutor(1, thread_name_prefix="facepipe-finetune-decode") as pool:
        while step < total_steps:
            epoch, first = divmod(step, steps_per_epoch)
            plan = epoch_plan(labels, groups, epoch, ft.seed, rank, world, pk, 0)
            rng = np.random.default_rng([ft.seed, epoch, rank])
            flips = [rng.random(len(b)) < 0.5 for b in plan]
            pending = pool.submit(load, plan[first], flips[first])
            for index in range(first, steps_per_epoch):
                images, lab = pending.result()
                if index + 1 < steps_per_epoch:  # decode the next batch while this one trains
                    pending = pool.submit(load, plan[index + 1], flips[index + 1])
                emb = model(images)
                trip, terms = triplet_loss(emb, lab, ft.triplet_margin, ft.hardest)
                loss = trip + centre_loss(emb, lab, centres, scale, ft.centre_weight)
                where = f"epoch {epoch}, batch {index} (step {step + 1}, rank {rank})"
                if stop_on_nonfinite(loss, where, cfg, rank, step, events):
                    metrics_log.flush()
                    return  # every rank together; the driver raises the recorded error (no Ray retry)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), ft.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                last = float(loss.detach())
                if rank == 0:
                    events.write(event="step", step=step, loss=last)
                    metrics_log.log(
                        {"train/loss": last, **{f"train/{k}": float(v) for k, v in terms.items()}}, step
                    )
                if step >= total_steps:
                    break
            final = step >= total_steps
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    save_training_state(
                        tmp,
                        {
                            "model": inner.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                        },
                        {"step": step},
                    )
                    if final:
                        save_bundle(Path(tmp) / "bundle", inner, info, centres)
                ray.train.report(
                    {"train/loss": last, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp)
                )
    metrics_log.flush()


def finetune(
    config: Config,
    shards_dir: str | os.PathLike | None = None,
    backbone_uri: str | None = None,
    run_name: str | None = None,
    register: bool = True,
    events_path: str | os.PathLike | None = None,
    track: bool = True,
) -> Any:
    """Fine-tune a backbone (triplet + centre term); registers it as a new `facepipe-backbone` version."""
    ft = config.finetune
    data = backbone_stage.resolve_data(shards_dir or config.paths.shards)
    name = run_name or f"finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    bundle_dir = tracking.resolve_bundle(
        backbone_uri or ft.backbone_uri, config.tracking, Path(config.paths.runs).resolve() / name / "start"
    )
    run_id = tracking.start_run(config, "finetune", data.shards_dir, "finetune", name) if track else None
    stage_config = {"bundle": str(Path(bundle_dir).resolve()), "image_shards": data.shards}
    status = "FAILED"
    try:
        outcome = launch_stage(finetune_worker, config, ft.scaling, name, run_id, stage_config, events_path)
        bundle = Path(outcome.checkpoint_path) / "bundle"
        backbone, info, _ = load_bundle(bundle)
        metrics = verify_pairs(
            backbone, data.shards_dir, tuple(info.input_size), info.color_order, config.eval.folds
        )
        result = backbone_stage.StageResult(run_id, bundle, metrics, seconds=outcome.seconds)
        if track:
            tracking.log_metrics(config.tracking, run_id, metrics, step=int(outcome.metrics.get("step", 0)))
            if register:
                result.model = tracking.log_and_register(config.tracking, run_id, "backbone", bundle, metrics)
        status = "FINISHED"
    finally:
        if track and run_id:
            tracking.end_run(config.tracking, run_id, status)
    backbone_stage.print_stage_summary("facepipe train finetune", name, result, "bundle", bundle, None)
    return result
