"""Stage 1: train a backbone with a margin head on Ray Train (DDP), tracked and registered in MLflow.

`train_backbone(config)` is the Python API behind `facepipe train backbone`. The driver resolves the
data (shards, class count, colour order from the manifest), opens an MLflow run, runs
`backbone_worker` on every Ray Train worker, then logs the plots and registers the model.

Each worker: streams its disjoint part of the shards (`ShardLoader`), runs backbone + margin head
under DDP (gloo on CPU, NCCL on GPU, autocast on GPU), SGD/AdamW with linear warmup then polynomial
decay, gradient clipping; every `checkpoint_every_steps` it reports a checkpoint (rank 0 writes it) and
after every epoch rank 0 runs 10-fold verification on the pair tables. On (re)start it resumes from
`ray.train.get_checkpoint()` at the exact batch it stopped after: the loader's plan is deterministic,
so no step is lost or repeated beyond the last checkpoint. Above `partial_fc_threshold` classes the
class centres are sharded across workers (PartialFC).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facepipe import tracking
from facepipe.config import Config, OptimConfig
from facepipe.data.loader import ShardLoader
from facepipe.data.shards import list_shards, pair_tables, read_manifest
from facepipe.errors import FacepipeError
from facepipe.eval.verification import evaluate_embeddings
from facepipe.fsutil import torch_save_atomic
from facepipe.models.bundle import CENTRES_FILE, BundleInfo, load_bundle, save_bundle
from facepipe.models.embed import embed_pair_table
from facepipe.progress import summary
from facepipe.train.checkpoint import load_training_state, save_training_state
from facepipe.train.collective import all_agree, gather_objects
from facepipe.train.features import merge_verification, verify_pairs
from facepipe.train.nonfinite import nonfinite_flag, record_nonfinite
from facepipe.train.ray_job import launch_stage, set_threads, worker_context, worker_device
from facepipe.train.schedule import BudgetSchedule, lr_factor

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Data description (driver side)
# ---------------------------------------------------------------------------------------------


@dataclass
class DataInfo:
    shards_dir: str
    shards: list[str]
    num_classes: int
    color_order: str
    num_images: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_data(shards_dir: str | os.PathLike) -> DataInfo:
    """Shards, class count and colour order of a decoded dataset (from its manifest)."""

    shards_dir = Path(shards_dir).resolve()
    manifest = read_manifest(shards_dir)
    shards = [str(p) for p in list_shards(shards_dir)]
    if not shards:
        raise FacepipeError(f"no training shards under {shards_dir} (run `facepipe decode` first)")
    num_classes = int(manifest.get("num_classes") or 0)
    if num_classes <= 0:
        raise FacepipeError(f"manifest of {shards_dir} has no class count")
    return DataInfo(
        str(shards_dir),
        shards,
        num_classes,
        manifest.get("color_order", "RGB"),
        int(manifest.get("num_images", 0)),
    )


# ---------------------------------------------------------------------------------------------
# Pieces shared by the worker loops
# ---------------------------------------------------------------------------------------------


def build_optimizer(params: Any, optim: OptimConfig) -> Any:
    import torch

    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def build_scheduler(optimizer: Any, total_steps: int, warmup_steps: int, power: float) -> Any:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, power)
    )


def margin_head_kwargs(name: str, s: float, m: float, extra: dict[str, Any]) -> dict[str, Any]:
    """s and m for heads whose constructor takes them, then head-specific extras."""
    from facepipe.models.registry import MARGIN_HEADS

    factory = MARGIN_HEADS.get(name)
    target = getattr(factory, "func", factory)
    accepted = set(inspect.signature(target).parameters) if target is not None else set()
    kwargs = {k: v for k, v in (("s", s), ("m", m)) if k in accepted}
    kwargs.update(extra)
    return kwargs


class EventLog:
    """JSON lines appended by workers (start, step, checkpoint): the tests' view of what ran where.

    One `write` per line with O_APPEND, so lines of concurrent writers never interleave.
    """

    def __init__(self, path: str | None):
        self.path = path

    def write(self, **event: Any) -> None:
        if not self.path:
            return
        line = (json.dumps(event) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    text = Path(path).read_text() if Path(path).exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


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


# ---------------------------------------------------------------------------------------------
# The per-worker loop
# ---------------------------------------------------------------------------------------------


def backbone_worker(cfg: dict[str, Any]) -> None:
    import numpy as np
    import ray.train
    import torch

    from facepipe.models.registry import build_backbone, build_margin_head  # lazy: torch

    set_threads()
    config = Config.model_validate(cfg["config"])
    tb = config.train_backbone
    data = DataInfo(**cfg["data"])
    rank, world, node = worker_context()
    device = worker_device(tb.scaling.use_gpu)
    use_amp = bool(tb.amp and device.type == "cuda")
    events = EventLog(cfg.get("events_path"))
    torch.manual_seed(tb.seed)  # identical initialisation on every rank (DDP also broadcasts rank 0's)
    np.random.seed(tb.seed + rank)

    input_size = tuple(tb.backbone.input_size)
    backbone_kwargs = {
        "embedding_size": tb.backbone.embedding_size,
        "input_size": list(input_size),
        **tb.backbone.extra,
    }
    backbone = build_backbone(tb.backbone.name, **backbone_kwargs)
    head_kwargs = margin_head_kwargs(tb.margin.name, tb.margin.s, tb.margin.m, tb.margin.extra)
    partial_fc = data.num_classes > tb.partial_fc_threshold
    if partial_fc:
        from facepipe.models.partial_fc import PartialFC

        margin = build_margin_head(tb.margin.name, **head_kwargs)
        head = PartialFC(
            margin,
            embedding_size=backbone.embedding_size,
            num_classes=data.num_classes,
            sample_rate=tb.partial_fc_sample_rate,
            rank=rank,
            world_size=world,
        )
    else:
        head = build_margin_head(
            tb.margin.name,
            embedding_size=backbone.embedding_size,
            num_classes=data.num_classes,
            **head_kwargs,
        )
    # NHWC: oneDNN's convolutions with few channels run several times faster than NCHW on CPU
    memory_format = torch.channels_last if tb.channels_last else torch.contiguous_format
    backbone = backbone.to(memory_format=memory_format)
    objective = _objective_module(backbone, head)
    if partial_fc:
        # the backbone is data-parallel; the sharded centres are not (each rank owns its own slice)
        objective.backbone = ray.train.torch.prepare_model(backbone)
        head.to(device)
    else:
        objective = ray.train.torch.prepare_model(objective)
    inner = getattr(objective, "module", objective)

    loader = ShardLoader(
        data.shards,
        tb.batch_size,
        input_size,
        data.color_order,
        rank,
        world,
        seed=tb.seed,
        flip=tb.loader.flip,
        workers=tb.loader.workers,
        mode=tb.loader.mode,
        prefetch=tb.loader.prefetch,
        window_rows=tb.loader.window_rows,
    )
    steps_per_epoch = len(loader)
    total_steps = tb.epochs * steps_per_epoch
    if tb.max_steps:
        total_steps = min(total_steps, tb.max_steps)
    warmup = int(tb.optim.warmup_epochs * steps_per_epoch)
    optimizer = build_optimizer([p for p in objective.parameters() if p.requires_grad], tb.optim)
    budget_s = tb.max_minutes * 60 if tb.max_minutes is not None else None
    scheduler = BudgetSchedule(optimizer, total_steps, warmup, tb.optim.poly_power, budget_s)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state, meta = load_training_state(directory)
            if partial_fc:
                shard = torch.load(Path(directory) / f"centres-rank{rank}.pt", weights_only=True)
                state["model"].update({f"head.{k}": v for k, v in shard.items()})
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = int(meta["step"])
    events.write(event="start", rank=rank, world=world, pid=os.getpid(), node=node, step=step)
    metrics_log = (
        tracking.MetricLogger(cfg.get("tracking_uri"), cfg.get("run_id"))
        if rank == 0
        else tracking.MetricLogger(None, None)
    )

    def model_state() -> dict[str, Any]:
        state = inner.state_dict()
        if partial_fc:  # each rank saves its own slice of the centres
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        return state

    def report(metrics: dict[str, Any], with_checkpoint: bool, final: bool = False) -> None:
        metrics = {**metrics, "step": step, "epoch": step / steps_per_epoch}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_training_state(
                    tmp,
                    {
                        "model": model_state(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                    },
                    {"step": step, "epoch": step // steps_per_epoch, "steps_per_epoch": steps_per_epoch},
                )
                if final or not partial_fc:
                    centres = None if partial_fc else inner.head.weight
                    info = BundleInfo(
                        tb.backbone.name,
                        backbone_kwargs,
                        backbone.embedding_size,
                        input_size,
                        data.color_order,
                        data.num_classes,
                        tb.margin.name,
                        {"margin_s": tb.margin.s, "step": step},
                    )
                    save_bundle(Path(tmp) / "bundle", backbone, info, centres)
            if partial_fc:
                torch.save(
                    {k[len("head.") :]: v for k, v in inner.state_dict().items() if k.startswith("head.")},
                    Path(tmp) / f"centres-rank{rank}.pt",
                )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if rank == 0:
            events.write(event="checkpoint", step=step)

    def verify(model: Any) -> dict[str, float]:
        # every rank verifies its share of the pair tables (a rank idles in the next step's collective
        # otherwise); rank 0 gathers the parts
        part = verify_pairs(
            model,
            data.shards_dir,
            input_size,
            data.color_order,
            config.eval.folds,
            cfg.get("raw_dir"),
            flip=tb.verify_flip,
            rank=rank,
            world=world,
        )
        return merge_verification(gather_objects(part))

    # time used by earlier attempts of this run counts against the budget (restored with the schedule)
    elapsed_before = scheduler.elapsed_s
    start_time = time.monotonic()
    samples = 0
    # steady-state throughput: from the end of this attempt's first step (warm-up excluded)
    rate_start, rate_samples = None, 0
    last_loss = math.nan
    stop_reason = "done"
    objective.train()
    while step < total_steps:
        epoch, first_batch = divmod(step, steps_per_epoch)
        t0 = time.monotonic()
        for batch in loader.epoch(epoch, start_batch=first_batch):
            images = batch.images.to(device, non_blocking=True, memory_format=memory_format)
            labels = batch.labels.to(device, non_blocking=True)
            loss = objective(images, labels, use_amp)
            where = f"epoch {epoch}, batch {batch.index} (step {step + 1}, rank {rank})"
            # ranks agree on the time used so that the rate (a function of it) stays identical on all
            own_elapsed = elapsed_before + time.monotonic() - start_time
            bad, elapsed = all_agree([nonfinite_flag(loss), own_elapsed])
            elapsed /= world
            late = budget_s is not None and elapsed > budget_s
            if bad:
                # every rank stops here together; a rank whose own loss is bad leaves its record beside
                # the checkpoints (plain return: a raise would make Ray retry a deterministic failure)
                record_nonfinite(loss, where, cfg["error_dir"], rank, step, events)
                loader.close()
                return
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), tb.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step(elapsed)
            step += 1
            samples += len(labels)
            if rate_start is None:
                rate_start = time.monotonic()
            else:
                rate_samples += len(labels)
            last_loss = float(loss.detach())
            if rank == 0:
                events.write(event="step", step=step, loss=last_loss)
                if step % tb.log_every_steps == 0:
                    elapsed = max(time.monotonic() - t0, 1e-9)
                    metrics_log.log(
                        {
                            "train/loss": last_loss,
                            "train/lr": scheduler.get_last_lr()[0],
                            "train/grad_norm": float(grad_norm),
                            "train/images_s": samples * world / elapsed,
                        },
                        step,
                    )
            if late:
                stop_reason = "time limit"
                total_steps = step
            if step >= total_steps or step % steps_per_epoch == 0:
                break  # the epoch's end is handled below
            if step % tb.checkpoint_every_steps == 0:
                report({"train/loss": last_loss}, with_checkpoint=True)
        samples = 0
        if step >= total_steps:
            break
        metrics = {"train/loss": last_loss}
        if tb.verify_every_epoch:
            metrics.update(verify(backbone))  # a collective: every rank takes part
            if rank == 0:
                metrics_log.log({k: v for k, v in metrics.items() if isinstance(v, float)}, step)
                metrics_log.flush()
        report(metrics, with_checkpoint=step % tb.checkpoint_every_steps == 0)
    # the final verification travels with the final checkpoint (rank 0's metrics reach the driver)
    final: dict[str, Any] = {"train/loss": last_loss, "stop_reason": stop_reason}
    if rate_start is not None and rate_samples:
        final["train/samples_s"] = rate_samples * world / (time.monotonic() - rate_start)
    final.update(verify(backbone))
    if rank == 0:
        metrics_log.log({k: v for k, v in final.items() if isinstance(v, float)}, step)
        metrics_log.flush()
    report(final, with_checkpoint=True, final=True)
    loader.close()


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


@dataclass
class StageResult:
    run_id: str | None
    bundle_dir: Path
    metrics: dict[str, Any]
    model: dict[str, Any] | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def print_stage_summary(
    title: str, name: str, result: StageResult, output_label: str, output: object, seconds: float | None
) -> None:
    """The short end-of-stage summary every training stage prints: run, MLflow run, output, model."""
    model = result.model
    lines = {
        "run": name,
        "mlflow run": result.run_id,
        output_label: output,
        "accuracy": result.metrics.get("accuracy"),
        "model": f"{model['name']} v{model['version']}" if model else "not registered",
    }
    if seconds is not None:
        lines["seconds"] = f"{seconds:.0f}"
    print(summary(title, lines))


def train_backbone(
    config: Config,
    shards_dir: str | os.PathLike | None = None,
    run_name: str | None = None,
    register: bool = True,
    events_path: str | os.PathLike | None = None,
    track: bool = True,
) -> StageResult:
    """Train the backbone stage on Ray Train; returns the bundle, final metrics and registered version.

    Re-running with the same `run_name` resumes that run from its latest checkpoint.
    """

    tb = config.train_backbone
    data = resolve_data(shards_dir or config.paths.shards)
    name = run_name or f"backbone-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = (
        tracking.start_run(config, "backbone", data.shards_dir, "train_backbone", name) if track else None
    )
    stage_config = {"data": data.to_dict(), "raw_dir": str(Path(config.paths.raw).resolve())}
    status = "FAILED"
    try:
        outcome = launch_stage(
            backbone_worker, config, tb.scaling, name, run_id, stage_config, events_path, tb.max_failures
        )
        bundle = Path(outcome.checkpoint_path) / "bundle"
        assemble_centres(Path(outcome.checkpoint_path), bundle)
        metrics = {k: v for k, v in outcome.metrics.items() if isinstance(v, int | float)}
        result = StageResult(run_id, bundle, metrics, seconds=outcome.seconds)
        if track:
            plots = write_plots(config, run_id, bundle, data, Path(outcome.run_path) / "plots")
            tracking.log_artifacts(config.tracking, run_id, plots, "plots")
            if register:
                result.model = tracking.log_and_register(config.tracking, run_id, "backbone", bundle, metrics)
        status = "FINISHED"
    finally:
        if track and run_id:
            tracking.end_run(config.tracking, run_id, status)
    print_stage_summary("facepipe train backbone", name, result, "bundle", bundle, outcome.seconds)
    return result


def assemble_centres(checkpoint_dir: Path, bundle: Path) -> None:
    """Join PartialFC's per-rank centre shards (contiguous class blocks, rank order) into the bundle."""
    import torch

    shards = sorted(checkpoint_dir.glob("centres-rank*.pt"), key=lambda p: int(p.stem.split("rank")[1]))
    if not shards or (bundle / CENTRES_FILE).is_file():
        return
    weights = [torch.load(p, map_location="cpu", weights_only=True)["weight"] for p in shards]
    torch_save_atomic(torch.cat(weights).float(), bundle / CENTRES_FILE)


def write_plots(
    config: Config, run_id: str | None, bundle: Path, data: DataInfo, out_dir: Path
) -> list[Path]:
    """Training curves (from the run's metric history) and ROC curves of the final model, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if run_id:
        history = tracking.client(config.tracking).get_metric_history(run_id, "train/loss")
        if history:
            steps = [m.step for m in history]
            values = [m.value for m in history]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(steps, values, lw=1.5)
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
            ax.set_title("Backbone training loss")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            paths.append(out_dir / "train_loss.png")
            fig.savefig(paths[-1], dpi=120)
            plt.close(fig)
    backbone, info, _ = load_bundle(bundle)
    tables = pair_tables(data.shards_dir)
    if tables:
        fig, ax = plt.subplots(figsize=(6, 5))
        for name, path in tables.items():
            out = embed_pair_table(backbone, path, info.input_size, info.color_order)
            res = evaluate_embeddings(out["embedding"], out["issame"], out["flipped"])
            fpr = np.clip(res.fpr, 1e-4, 1)
            ax.plot(fpr, res.tpr, label=f"{name} (acc {res.accuracy:.3f})")
        ax.set_xscale("log")
        ax.set_xlim(1e-3, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.set_title("Verification ROC (flip-fused embeddings)")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        paths.append(out_dir / "roc.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
