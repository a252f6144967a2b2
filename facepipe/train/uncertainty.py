"""Stage 2: train an uncertainty head (any method of `facepipe.uncertainty.registry`) on a frozen backbone.

The backbone comes from a model URI (`models:/facepipe-backbone@champion`) or a bundle/checkpoint path
and never trains. By default its outputs (embedding + final conv map) are computed once and cached as
shards (`facepipe.train.features.cache_features`), so the head trains without re-running the
backbone; with `cache_features: false` every batch is decoded and pushed through the backbone.

Everything method-specific comes from the method's registry entry, which travels to the workers as
it is (so a method registered at run time trains too): its batching (P classes × K images for pair
losses, plain batches otherwise, see `facepipe.data.sampling`), whether its loss needs the class
centres `w_c` saved with the backbone, its registered model name and its uncertainty width.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from facepipe import tracking
from facepipe.config import Config
from facepipe.data.loader import shard_units
from facepipe.data.sampling import epoch_plan, unit_labels, windows
from facepipe.data.shards import pair_tables
from facepipe.errors import FacepipeError
from facepipe.eval.risk import risk_controlled_accuracy
from facepipe.eval.scoring import method_pair_scores
from facepipe.eval.verification import kfold_accuracy_scores
from facepipe.models.bundle import load_bundle
from facepipe.models.embed import decode_images_of, embed_images
from facepipe.train.backbone import (
    EventLog,
    StageResult,
    build_optimizer,
    build_scheduler,
    print_stage_summary,
    resolve_data,
)
from facepipe.train.checkpoint import load_training_state, save_training_state
from facepipe.train.feature_source import CachedFeatures, RecomputedFeatures, prepare_features
from facepipe.train.features import pair_degradation
from facepipe.train.nonfinite import stop_on_nonfinite
from facepipe.train.ray_job import launch_stage, set_threads, worker_context

log = logging.getLogger(__name__)

WINDOW_ROWS = 8192  # rows per planning window: whole classes, a bounded set of row groups


# ---------------------------------------------------------------------------------------------
# The per-worker loop
# ---------------------------------------------------------------------------------------------


def head_loss(
    model: Any, method: Any, emb: np.ndarray, fmap: np.ndarray, labels: np.ndarray, class_weights: Any
) -> tuple[Any, dict[str, Any]]:
    """The method's loss for one batch of frozen backbone outputs (μ is the unit embedding)."""
    import torch
    import torch.nn.functional as F

    mu = F.normalize(torch.from_numpy(np.ascontiguousarray(emb)).float(), dim=1)
    out = model(torch.from_numpy(np.ascontiguousarray(fmap)))
    kwargs = {"class_weights": class_weights} if class_weights is not None else {}
    return method.loss(mu, out, torch.from_numpy(labels), **kwargs)


def head_worker(cfg: dict[str, Any]) -> None:
    import ray.train
    import torch

    from facepipe.uncertainty.head_io import build_head_model  # lazy: torch

    set_threads()
    config = Config.model_validate(cfg["config"])
    tu = config.train_uncertainty
    method = cfg["method"]  # the registry entry itself, not a name: the worker needs no registry
    rank, world, node = worker_context()
    events = EventLog(cfg.get("events_path"))
    torch.manual_seed(tu.seed)
    map_shape = tuple(cfg["map_shape"])
    centres = None
    if cfg["cache_dir"]:
        units = shard_units(cfg["cache_shards"])
        source: Any = CachedFeatures(units, map_shape)
        if method.needs_class_centres:
            _, _, centres = load_bundle(cfg["bundle"])
    else:
        backbone, info, centres = load_bundle(cfg["bundle"])
        for p in backbone.parameters():
            p.requires_grad_(False)
        units = shard_units(cfg["image_shards"])
        source = RecomputedFeatures(units, backbone, tuple(info.input_size), info.color_order)
    labels = unit_labels(units)
    total_rows = sum(u.rows for u in units)
    # windows of whole classes, but enough of them that every rank gets some
    groups = windows(units, min(cfg["window_rows"], max(total_rows // (2 * world), 1)))
    pk = (tu.classes_per_batch, tu.images_per_class) if method.batching == "pk" else None
    steps_per_epoch = len(epoch_plan(labels, groups, 0, tu.seed, rank, world, pk, tu.batch_size))
    if steps_per_epoch == 0:
        raise FacepipeError("the data gives no batch per worker: lower classes_per_batch or batch_size")
    total_steps = tu.epochs * steps_per_epoch
    if tu.max_steps:
        total_steps = min(total_steps, tu.max_steps)

    model = build_head_model(method, map_shape, cfg["embedding_size"], tu.extra)
    model = ray.train.torch.prepare_model(model)
    inner = getattr(model, "module", model)
    optimizer = build_optimizer(model.parameters(), tu.optim)
    warmup = int(tu.optim.warmup_epochs * steps_per_epoch)
    scheduler = build_scheduler(optimizer, total_steps, warmup, tu.optim.poly_power)
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
    class_weights = centres.float() if centres is not None else None

    def report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        metrics = {**metrics, "step": step, "epoch": step / steps_per_epoch}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_training_state(
                    tmp,
                    {
                        "model": inner.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                    },
                    {"step": step, "steps_per_epoch": steps_per_epoch},
                )
                from facepipe.uncertainty.head_io import save_head  # lazy: torch

                save_head(Path(tmp) / "head", inner, cfg["head_meta"])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    model.train()
    last = float("nan")
    epoch_seconds = []
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        plan = epoch_plan(labels, groups, epoch, tu.seed, rank, world, pk, tu.batch_size)
        t0 = time.monotonic()
        for index in range(first, steps_per_epoch):
            loss, terms = head_loss(model, method, *source.batch(plan[index]), class_weights)
            where = f"epoch {epoch}, batch {index} (step {step + 1}, rank {rank})"
            if stop_on_nonfinite(loss, where, cfg, rank, step, events):
                metrics_log.flush()
                return  # every rank together; the driver raises the recorded error (no Ray retry)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tu.optim.grad_clip)
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
        epoch_seconds.append(time.monotonic() - t0)
        if rank == 0:
            metrics_log.log({"train/epoch_seconds": epoch_seconds[-1]}, step)
        if step < total_steps:
            report({"train/loss": last}, with_checkpoint=True)
    metrics_log.flush()
    report(
        {"train/loss": last, "epoch_seconds": float(np.mean(epoch_seconds)) if epoch_seconds else 0.0},
        with_checkpoint=True,
    )


# ---------------------------------------------------------------------------------------------
# Evaluation of a trained head on the pair tables
# ---------------------------------------------------------------------------------------------


def evaluate_head(
    backbone: Any,
    head: Any,
    method: Any,
    shards_dir: str | os.PathLike,
    input_size: tuple[int, int],
    color_order: str,
    rejection_rates: list[float],
    raw_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Per pair table: uncertainty-aware 10-fold accuracy, risk-controlled accuracy, and, where the
    generator's `<set>.degradation.parquet` is in `raw_dir`, Spearman(uncertainty, degradation)."""
    import torch
    from scipy.stats import spearmanr

    spec = method  # a registry entry
    metrics: dict[str, float] = {}
    accs = []
    head.eval()
    for name, path in pair_tables(shards_dir).items():
        import pyarrow.parquet as pq

        embs, uncs, scal, issame = [], [], [], []
        for batch in pq.ParquetFile(path).iter_batches(
            batch_size=128, columns=["image_a", "image_b", "issame"]
        ):
            imgs = [
                i
                for pair in zip(
                    batch.column("image_a").to_pylist(), batch.column("image_b").to_pylist(), strict=True
                )
                for i in pair
            ]
            emb, _, fmap = embed_images(
                backbone, decode_images_of(imgs, input_size, color_order, str(path), 0), maps=True
            )
            with torch.no_grad():
                u = head.uncertainty(None, torch.from_numpy(fmap))
            embs.append(emb)
            uncs.append(u.numpy())
            scal.append(spec.uncertainty_scalar(u).numpy())
            issame.append(batch.column("issame").to_numpy(zero_copy_only=False))
        emb = np.concatenate(embs)
        mu = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        u = np.concatenate(uncs)
        s = np.concatenate(scal)
        same = np.concatenate(issame).astype(bool)
        scores = method_pair_scores(spec, mu[0::2], u[0::2], mu[1::2], u[1::2])
        acc = kfold_accuracy_scores(scores, same).accuracy
        metrics[f"val/{name}/accuracy"] = float(acc)
        accs.append(float(acc))
        cosine = np.sum(mu[0::2] * mu[1::2], axis=1)
        pair_unc = np.maximum(s[0::2], s[1::2])
        risk = risk_controlled_accuracy(cosine, same, pair_unc, rejection_rates)
        for r, a in zip(risk.rejection_rates, risk.accuracy, strict=True):
            metrics[f"val/{name}/risk_acc_reject_{int(round(r * 100))}"] = float(a)
        degradation = pair_degradation(raw_dir, name, len(same))
        if degradation is not None:
            rho = spearmanr(s, degradation.reshape(-1)).statistic
            metrics[f"val/{name}/spearman_degradation"] = float(rho)
    if accs:
        metrics["accuracy"] = float(np.mean(accs))
    return metrics


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def train_uncertainty(
    config: Config,
    shards_dir: str | os.PathLike | None = None,
    method: str | None = None,
    backbone_uri: str | None = None,
    run_name: str | None = None,
    register: bool = True,
    events_path: str | os.PathLike | None = None,
    track: bool = True,
) -> Any:
    """Train an uncertainty head on a frozen backbone; returns a `StageResult` (see backbone.py)."""
    from facepipe.uncertainty.head_io import load_head  # lazy: torch
    from facepipe.uncertainty.registry import get_method

    tu = config.train_uncertainty
    try:
        spec = get_method(method or tu.method)
    except ValueError as err:
        raise FacepipeError(str(err)) from None
    method = spec.name
    data = resolve_data(shards_dir or config.paths.shards)
    name = run_name or f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    bundle_dir = tracking.resolve_bundle(
        backbone_uri or tu.backbone_uri,
        config.tracking,
        Path(config.paths.runs).resolve() / name / "backbone",
    )
    _, info, centres = load_bundle(bundle_dir)
    if spec.needs_class_centres and centres is None:
        raise FacepipeError(
            f"{method} needs the class centres saved by the backbone stage; {bundle_dir} has none"
        )
    features = prepare_features(config, bundle_dir, data.shards, data.shards_dir, tu.cache_features)
    run_id = tracking.start_run(config, method, data.shards_dir, "train_uncertainty", name) if track else None
    head_meta = {
        "method": method,
        "map_shape": list(features.map_shape),
        "embedding_size": features.embedding_size,
        "extra": tu.extra,
    }
    stage_config = {
        "method": spec,
        "bundle": str(Path(bundle_dir).resolve()),
        "cache_dir": features.cache_dir,
        "cache_shards": features.cache_shards,
        "image_shards": data.shards,
        "map_shape": list(features.map_shape),
        "embedding_size": features.embedding_size,
        "head_meta": head_meta,
        "window_rows": WINDOW_ROWS,
    }
    status = "FAILED"
    try:
        outcome = launch_stage(head_worker, config, tu.scaling, name, run_id, stage_config, events_path)
        head_dir = Path(outcome.checkpoint_path) / "head"
        backbone, info, _ = load_bundle(bundle_dir)
        metrics = evaluate_head(
            backbone,
            load_head(head_dir),
            spec,
            data.shards_dir,
            tuple(info.input_size),
            info.color_order,
            config.eval.rejection_rates,
            config.paths.raw,
        )
        metrics["epoch_seconds"] = float(outcome.metrics.get("epoch_seconds", 0.0))
        result = StageResult(
            run_id,
            bundle_dir,
            metrics,
            seconds=outcome.seconds,
            extra={"head_dir": str(head_dir), "cache_dir": features.cache_dir},
        )
        if track:
            tracking.log_metrics(config.tracking, run_id, metrics, step=int(outcome.metrics.get("step", 0)))
            if register:
                result.model = tracking.log_and_register(
                    config.tracking,
                    run_id,
                    method,
                    bundle_dir,
                    metrics,
                    head_dir=head_dir,
                    uncertainty_size=spec.uncertainty_size(features.embedding_size),
                )
        status = "FINISHED"
    finally:
        if track and run_id:
            tracking.end_run(config.tracking, run_id, status)
    print_stage_summary(
        f"facepipe train uncertainty ({method})", name, result, "head", head_dir, outcome.seconds
    )
    return result
