"""The one Ray Train worker loop every training stage runs (as opensphere's `BaseTrainer`).

`StageLoop.entry(cfg)` is the function Ray Train runs on each worker. The base owns everything the
stages share:

* setup: thread cap, config, rank/world, seed, the device (`ray.train.torch.get_device()`), event log
  and MLflow metric logger (rank 0 only);
* resume from `ray.train.get_checkpoint()` at the exact step it stopped after (the batch plans are
  deterministic, so no step is lost or repeated beyond the last checkpoint);
* per step: batch to the device (uint8 images normalised there: `facepipe.models.preprocess`),
  `train_step`, the non-finite stop (`facepipe.train.nonfinite`: all ranks agree, nobody raises),
  the AMP-scaled optimiser step (AMP only on CUDA), gradient clipping, the schedule (steps and,
  optionally, a wall-clock budget), step events and metrics;
* checkpoints (every `checkpoint_every` steps and at each epoch's end) and the final report.

A stage subclasses it and supplies only `setup` (model, optimiser, plan), `batches` and `train_step`,
plus optional hooks (`save_artifacts`, `restore`, `epoch_metrics`, `final_metrics`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from facepipe import tracking
from facepipe.config import Config, OptimConfig
from facepipe.data.sampling import epoch_plan, unit_labels, windows
from facepipe.errors import FacepipeError
from facepipe.train.checkpoint import load_training_state, save_training_state
from facepipe.train.collective import all_agree
from facepipe.train.mailbox import EventLog
from facepipe.train.nonfinite import nonfinite_flag, record_nonfinite
from facepipe.train.ray_job import set_threads, worker_context
from facepipe.train.schedule import BudgetSchedule, lr_factor

WINDOW_ROWS = 8192  # rows per planning window: whole classes, a bounded set of row groups


def build_optimizer(params: Any, optim: OptimConfig) -> Any:
    import torch

    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def build_scheduler(optimizer: Any, total_steps: int, warmup_steps: int, power: float) -> Any:
    """A plain step-planned `LambdaLR` (benchmarks; the stages use `BudgetSchedule`)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, power)
    )


class UnitPlan:
    """Deterministic per-epoch batch plans over shard row groups: P×K (`pk`) or plain batches."""

    def __init__(
        self,
        units: list[Any],
        seed: int,
        rank: int,
        world: int,
        pk: tuple[int, int] | None,
        batch_size: int,
        window_rows: int = WINDOW_ROWS,
    ) -> None:
        self.units, self.seed, self.rank, self.world = units, seed, rank, world
        self.pk, self.batch_size = pk, batch_size
        self.labels = unit_labels(units)
        total_rows = sum(u.rows for u in units)
        # windows of whole classes, but enough of them that every rank gets some
        self.groups = windows(units, min(window_rows, max(total_rows // (2 * world), 1)))
        self.steps_per_epoch = len(self.epoch(0))
        if self.steps_per_epoch == 0:
            raise FacepipeError("the data gives no batch per worker: lower classes_per_batch or batch_size")

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The batches of (unit, row) pairs this rank trains in `epoch`."""
        return epoch_plan(
            self.labels, self.groups, epoch, self.seed, self.rank, self.world, self.pk, self.batch_size
        )


class StageLoop:
    """Base of the per-worker training loops; see the module docstring for what it owns."""

    section: ClassVar[str]  # the config section of the stage (seed, epochs, max_steps, optim)
    checkpoint_every: int | None = None  # mid-epoch checkpoints every N steps (None: epoch ends only)
    log_every: int = 1  # per-step metrics to MLflow every N steps
    budget_s: float | None = None  # wall-clock budget of the run (all attempts together)
    amp_requested: bool = False  # the stage's `amp` setting; it takes effect on CUDA devices only
    input_memory_format: Any = None  # layout of normalised images (None: channels-last)

    def __init__(self, cfg: dict[str, Any]) -> None:
        import ray.train.torch
        import torch

        set_threads()
        self.cfg = cfg
        self.config = Config.model_validate(cfg["config"])
        self.settings = getattr(self.config, self.section)
        self.rank, self.world, self.node = worker_context()
        self.device = ray.train.torch.get_device()
        self.events = EventLog(cfg.get("mailbox"), keep_events=bool(cfg.get("keep_events")))
        torch.manual_seed(self.settings.seed)  # identical initialisation on every rank
        np.random.seed(self.settings.seed + self.rank)
        self.step = 0
        own = self.rank == 0  # rank 0 alone logs to MLflow
        self.metrics_log = tracking.MetricLogger(
            cfg.get("tracking_uri") if own else None, cfg.get("run_id") if own else None
        )

    @classmethod
    def entry(cls, cfg: dict[str, Any]) -> None:
        """The function Ray Train runs on every worker."""
        loop = cls(cfg)
        try:
            loop.setup()
            loop.run()
        finally:
            loop.close()

    # --- what a stage supplies -------------------------------------------------------------------

    def setup(self) -> None:
        """Build `model` (what trains, possibly DDP-wrapped) and call `plan_training`."""
        raise NotImplementedError

    def batches(self, epoch: int, first: int) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """(batch index, tensors) of `epoch` from batch `first` on; the last tensor holds the labels."""
        raise NotImplementedError

    def train_step(self, batch: tuple[Any, ...]) -> tuple[Any, dict[str, Any]]:
        """(loss, extra terms to log) of one batch already on `self.device`."""
        raise NotImplementedError

    # --- optional hooks --------------------------------------------------------------------------

    def place(self, batch: tuple[Any, ...]) -> tuple[Any, ...]:
        """Tensors to the device; uint8 NHWC images go over as bytes and are normalised there."""
        import torch

        from facepipe.models.preprocess import to_model_input

        return tuple(
            to_model_input(t, self.device, self.input_memory_format)
            if t.dtype == torch.uint8 and t.dim() == 4
            else t.to(self.device, non_blocking=True)
            for t in batch
        )

    def model_state(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def restore(self, state: dict[str, Any], directory: Path) -> None:
        """Adjust a loaded training state before it is applied (e.g. per-rank pieces)."""

    def save_artifacts(self, directory: Path, final: bool) -> None:
        """Write the stage's artifacts beside the training state (every rank calls it)."""

    def epoch_metrics(self) -> dict[str, Any]:
        return {}

    def final_metrics(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Release the batch source (threads, files)."""

    # --- the shared machinery --------------------------------------------------------------------

    def plan_training(self, params: Any, steps_per_epoch: int) -> None:
        """Steps, optimiser, schedule and AMP scaler from the stage's config section."""
        import torch

        s = self.settings
        self.inner = getattr(self.model, "module", self.model)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = s.epochs * steps_per_epoch
        if s.max_steps:
            self.total_steps = min(self.total_steps, s.max_steps)
        self.optimizer = build_optimizer([p for p in params if p.requires_grad], s.optim)
        warmup = int(s.optim.warmup_epochs * steps_per_epoch)
        self.scheduler = BudgetSchedule(
            self.optimizer, self.total_steps, warmup, s.optim.poly_power, self.budget_s
        )
        self.amp = bool(self.amp_requested and self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def autocast(self) -> Any:
        import torch

        return torch.autocast(self.device.type, enabled=self.amp) if self.amp else contextlib.nullcontext()

    def resume(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                state, meta = load_training_state(directory)
                self.restore(state, Path(directory))
            self.inner.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state.get("scaler", {}))
            self.step = int(meta["step"])
        self.events.write(
            event="start", rank=self.rank, world=self.world, pid=os.getpid(), node=self.node, step=self.step
        )

    def report(self, metrics: dict[str, Any], with_checkpoint: bool, final: bool = False) -> None:
        import ray.train

        metrics = {**metrics, "step": self.step, "epoch": self.step / self.steps_per_epoch}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            if self.rank == 0:
                state = {
                    "model": self.model_state(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                }
                meta = {
                    "step": self.step,
                    "epoch": self.step // self.steps_per_epoch,
                    "steps_per_epoch": self.steps_per_epoch,
                }
                save_training_state(tmp, state, meta)
            self.save_artifacts(Path(tmp), final)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if self.rank == 0:
            self.events.write(event="checkpoint", step=self.step)

    def say_epoch(
        self, last: float, samples_s: float, metrics: dict[str, Any], attempt: tuple[int, float]
    ) -> None:
        """Rank 0's one console line per epoch: loss, samples/s, validation accuracy, time left. It starts
        with "facepipe" so that a stage's console keeps it (facepipe.console) while Ray's output goes to
        the log file."""
        if self.rank != 0:
            return
        first_step, started = attempt
        done, seconds = self.step - first_step, time.monotonic() - started
        left = (self.total_steps - self.step) * seconds / done if done else math.nan
        epochs = -(-self.total_steps // self.steps_per_epoch)
        epoch = -(-self.step // self.steps_per_epoch)
        accuracy = metrics.get("accuracy")
        parts = [
            f"facepipe train {self.section.removeprefix('train_')}: epoch {epoch}/{epochs}",
            f"step {self.step}/{self.total_steps}",
            f"loss {last:.4f}",
            f"{samples_s:.0f} samples/s",
            *([f"val acc {accuracy:.4f}"] if isinstance(accuracy, float) else []),
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(left)) if math.isfinite(left) else '?'}",
        ]
        # not print(): Ray Train patches it into its logger and, with stdout wrapped, also echoes it,
        # so every epoch line reached the console twice; a plain write goes out once
        sys.stdout.write("  ".join(parts) + "\n")
        sys.stdout.flush()

    def log_floats(self, metrics: dict[str, Any]) -> None:
        if self.rank == 0:
            self.metrics_log.log({k: v for k, v in metrics.items() if isinstance(v, float)}, self.step)

    def run(self) -> None:
        import torch

        self.resume()
        # time used by earlier attempts of this run counts against the budget (restored with the schedule)
        elapsed_before, start_time = self.scheduler.elapsed_s, time.monotonic()
        # steady-state throughput: from the end of this attempt's first step (warm-up excluded)
        rate_start, rate_samples = None, 0
        last, stop_reason, epoch_seconds = math.nan, "done", []
        attempt = (self.step, time.monotonic())  # for the console's time left
        self.model.train()
        while self.step < self.total_steps:
            epoch, first = divmod(self.step, self.steps_per_epoch)
            t0, samples = time.monotonic(), 0
            for index, batch in self.batches(epoch, first):
                batch = self.place(batch)
                loss, terms = self.train_step(batch)
                # ranks agree on the time used so that the rate (a function of it) stays identical on all
                own_elapsed = elapsed_before + time.monotonic() - start_time
                bad, elapsed = all_agree([nonfinite_flag(loss), own_elapsed])
                elapsed /= self.world
                if bad:
                    # every rank stops here together; a rank whose own loss is bad leaves its record for
                    # the driver (plain return: a raise would make Ray retry a deterministic failure)
                    where = f"epoch {epoch}, batch {index} (step {self.step + 1}, rank {self.rank})"
                    record_nonfinite(loss, where, self.rank, self.step, self.events)
                    self.metrics_log.flush()
                    return
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.model.parameters(), self.settings.optim.grad_clip
                )
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step(elapsed)
                self.step += 1
                samples += len(batch[-1])
                if rate_start is None:
                    rate_start = time.monotonic()
                else:
                    rate_samples += len(batch[-1])
                last = float(loss.detach())
                if self.rank == 0:
                    self.events.write(event="step", step=self.step, loss=last)
                    if self.step % self.log_every == 0:
                        seconds = max(time.monotonic() - t0, 1e-9)
                        self.log_floats(
                            {
                                "train/loss": last,
                                **{f"train/{k}": float(v) for k, v in terms.items()},
                                "train/lr": self.scheduler.get_last_lr()[0],
                                "train/grad_norm": float(grad_norm),
                                "train/images_s": samples * self.world / seconds,
                            }
                        )
                if self.budget_s is not None and elapsed > self.budget_s:
                    stop_reason, self.total_steps = "time limit", self.step
                if self.step >= self.total_steps or self.step % self.steps_per_epoch == 0:
                    break  # the epoch's end is handled below
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.report({"train/loss": last}, with_checkpoint=True)
            epoch_seconds.append(time.monotonic() - t0)
            self.log_floats({"train/epoch_seconds": epoch_seconds[-1]})
            if self.step >= self.total_steps:
                break
            metrics = {"train/loss": last, **self.epoch_metrics()}  # may be a collective: all ranks
            self.say_epoch(last, samples * self.world / max(epoch_seconds[-1], 1e-9), metrics, attempt)
            self.log_floats(metrics)
            self.metrics_log.flush()
            every = self.checkpoint_every
            self.report(metrics, with_checkpoint=not every or self.step % every == 0)
        # the final metrics travel with the final checkpoint (rank 0's reach the driver)
        final: dict[str, Any] = {"train/loss": last, "stop_reason": stop_reason}
        final["epoch_seconds"] = float(np.mean(epoch_seconds)) if epoch_seconds else 0.0
        if rate_start is not None and rate_samples:
            final["train/samples_s"] = rate_samples * self.world / (time.monotonic() - rate_start)
        final.update(self.final_metrics())
        self.say_epoch(
            last,
            samples * self.world / max(epoch_seconds[-1], 1e-9) if epoch_seconds else 0.0,
            final,
            attempt,
        )
        self.log_floats(final)
        self.metrics_log.flush()
        self.report(final, with_checkpoint=True, final=True)
