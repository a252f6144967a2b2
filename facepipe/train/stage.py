"""The one stage driver: resolve data → start the MLflow run → run the loop on Ray → evaluate → register.

`StageDriver.run()` is the template every training stage (`backbone.py`, `head.py`, `finetune.py`)
follows; a stage supplies its worker loop (`facepipe.train.loop.StageLoop`), the keys its loop reads,
how to evaluate the finished checkpoint, and what to register. Also here: `DataInfo` (what the driver
reads from a decoded dataset's manifest), and `StageResult` (workers' events: `facepipe.train.mailbox`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facepipe import tracking
from facepipe.config import Config
from facepipe.config import ScalingConfig as ScalingSection
from facepipe.data.dataset import Dataset
from facepipe.errors import FacepipeError
from facepipe.eval.metrics import ACCURACY
from facepipe.progress import summary
from facepipe.storage import is_remote
from facepipe.train.ray_job import TrainOutcome, launch_stage


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
    """Shards, class count and colour order of a decoded dataset (from its manifest), local or at a URI."""
    dataset = Dataset.open(shards_dir if is_remote(shards_dir) else Path(shards_dir).resolve())
    shards = [str(p) for p in dataset.training_shards]
    if not shards:
        raise FacepipeError(f"no training shards under {dataset.location} (run `facepipe decode` first)")
    if dataset.num_classes <= 0:
        raise FacepipeError(f"manifest of {dataset.location} has no class count")
    return DataInfo(
        str(dataset.location), shards, dataset.num_classes, dataset.color_order, dataset.num_images
    )


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
        ACCURACY: result.metrics.get(ACCURACY),
        "model": f"{model['name']} v{model['version']}" if model else "not registered",
    }
    if seconds is not None:
        lines["seconds"] = f"{seconds:.0f}"
    print(summary(title, lines))


class StageDriver:
    """Template of a training stage's driver; subclasses set the class attributes and the hooks."""

    title: str  # of the printed summary
    kind: str  # the MLflow run's kind (and default run-name prefix)
    job_type: str
    register_as: str  # the registered model's kind (`tracking.log_and_register`)
    output_label = "bundle"

    def __init__(
        self,
        config: Config,
        shards_dir: str | os.PathLike | None = None,
        run_name: str | None = None,
        register: bool = True,
        events_path: str | os.PathLike | None = None,
        track: bool = True,
    ) -> None:
        """`run_name` reused resumes that run; `track=False` runs without MLflow (no run, no model)."""
        self.config = config
        self.data = resolve_data(shards_dir or config.paths.shards)
        self.name = run_name or f"{self.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.register, self.events_path, self.track = register, events_path, track

    # --- what a stage supplies -------------------------------------------------------------------

    def scaling(self) -> ScalingSection:
        raise NotImplementedError

    def entry(self) -> Any:
        """The per-worker function (a `StageLoop` subclass's `entry`)."""
        raise NotImplementedError

    def stage_config(self) -> dict[str, Any]:
        """Keys the loop reads besides those `launch_stage` adds."""
        raise NotImplementedError

    def evaluate(self, outcome: TrainOutcome, run_id: str | None) -> StageResult:
        raise NotImplementedError

    def output(self, result: StageResult) -> Path:
        return result.bundle_dir

    def log_results(self, result: StageResult, outcome: TrainOutcome) -> None:
        """Log the evaluation to the run (the loop logged the training curves)."""
        step = int(outcome.metrics.get("step", 0))
        tracking.log_metrics(self.config.tracking, result.run_id, result.metrics, step=step)

    def register_kwargs(self, result: StageResult) -> dict[str, Any]:
        return {}

    # --- the template ----------------------------------------------------------------------------

    def run(self) -> StageResult:
        config = self.config
        run_id = (
            tracking.start_run(config, self.kind, self.data.shards_dir, self.job_type, self.name)
            if self.track
            else None
        )
        status = "FAILED"
        try:
            outcome = launch_stage(
                self.entry(), config, self.scaling(), self.name, run_id, self.stage_config(), self.events_path
            )
            result = self.evaluate(outcome, run_id)
            result.seconds = outcome.seconds
            if self.track:
                self.log_results(result, outcome)
                if self.register:
                    result.model = tracking.log_and_register(
                        config.tracking,
                        run_id,
                        self.register_as,
                        result.bundle_dir,
                        result.metrics,
                        **self.register_kwargs(result),
                    )
            status = "FINISHED"
        finally:
            if self.track and run_id:
                tracking.end_run(config.tracking, run_id, status)
        print_stage_summary(
            self.title, self.name, result, self.output_label, self.output(result), result.seconds
        )
        return result
