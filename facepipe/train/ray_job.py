"""Running a training loop on Ray Train: cluster attach, Train configs, per-worker helpers.

The stage driver (`stage.py`) runs a stage's per-worker loop (a `loop.StageLoop` subclass of
`backbone.py`, `head.py` or `finetune.py`) through `launch_stage`, which adds the keys every loop reads
(config, MLflow run, events file, error directory), attaches Ray and calls `run_training`, which wraps
the loop in a `TorchTrainer` (Ray Train v2) with:

* `ScalingConfig` from the config (workers, GPUs, CPUs per worker),
* `RunConfig(storage_path, name)`: re-running with the same name resumes the run from its latest
  checkpoint (Ray restores it; the loop gets it through `ray.train.get_checkpoint()`),
* `FailureConfig(max_failures)`: a worker that dies restarts the worker group from the latest
  checkpoint inside the same run,
* `CheckpointConfig(num_to_keep)`.

`paths.runs` may be a URI (`s3://bucket/runs`): Ray Train then keeps checkpoints there through the
location's pyarrow filesystem (`facepipe.storage`), resumes from there, and the driver downloads the
final checkpoint into a local working copy of the run (`local_run_dir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facepipe import storage
from facepipe.cluster import ray_session
from facepipe.config import Config
from facepipe.config import ScalingConfig as ScalingSection
from facepipe.errors import FacepipeError
from facepipe.fsutil import absolute_tracking_uri
from facepipe.train.mailbox import Mailbox

log = logging.getLogger(__name__)

# Environment variables the driver forwards to the Train controller and workers (Ray propagates its own
# RAY_TRAIN_* variables; these are ours and the thread caps).
FORWARDED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


def worker_config(config: Config) -> dict[str, Any]:
    """The config as plain data for Ray workers, with relative `paths.*` and tracking stores absolute."""
    data = json.loads(config.model_dump_json())
    for key, value in data["paths"].items():
        if isinstance(value, str) and value and "://" not in value:
            data["paths"][key] = str(Path(value).resolve())
    tracking = data["tracking"]
    tracking["tracking_uri"] = absolute_tracking_uri(tracking["tracking_uri"])
    location = tracking.get("artifact_location")
    if location and "://" not in location:
        tracking["artifact_location"] = str(Path(location).resolve())
    return data


@dataclass
class TrainOutcome:
    """What a finished Train run hands back to the driver: `checkpoint_path` and `run_path` are local
    (a download of the final checkpoint when the run is stored at a URI, which `run_uri` then gives)."""

    metrics: dict[str, Any]
    checkpoint_path: str | None
    run_path: str
    seconds: float
    run_uri: str | None = None


def local_run_dir(runs: str | os.PathLike, name: str) -> Path:
    """The local folder of run `name`: `<runs>/<name>`, or for runs at a URI a working copy under the
    temp dir (the same one for the same location, so a resumed run finds it)."""
    if not storage.is_remote(runs):
        return Path(runs).resolve() / name
    key = hashlib.sha1(os.fspath(runs).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "facepipe-runs" / key / name


def run_training(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    scaling: ScalingSection,
    storage_path: str | os.PathLike,
    name: str,
    max_failures: int = 2,
    num_to_keep: int | None = 2,
) -> TrainOutcome:
    """Run `loop(loop_config)` on `scaling.num_workers` Ray Train workers; raise on failure."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # a loaded node can take more than Ray's default 60 s to start a worker group (imports, process group);
    # Ray propagates this variable from the driver to its controller
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    remote = storage.is_remote(storage_path)
    if remote:  # Ray Train writes and resumes through the location's filesystem
        filesystem, root = storage.resolve(storage_path)
    else:
        filesystem, root = None, str(Path(storage_path).resolve())
        Path(root).mkdir(parents=True, exist_ok=True)
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # one compute thread per requested CPU: oversubscribing cores slows every worker on a shared node
    threads = str(max(int(scaling.cpus_per_worker), 1))
    env.setdefault("OMP_NUM_THREADS", threads)
    env.setdefault("MKL_NUM_THREADS", threads)
    # idle OpenMP threads sleep instead of spinning: the loader's decode threads share these cores
    # (spinning cost 3-4x in step time on a 2-core node, measured with bench/train.py)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
            worker_runtime_env={"env_vars": env},
        ),
    )
    start = time.monotonic()
    try:
        result = trainer.fit()
    except Exception as err:
        raise FacepipeError(f"training run {name!r} failed: {_root_message(err)}") from err
    if result.error is not None:
        raise FacepipeError(f"training run {name!r} failed: {_root_message(result.error)}")
    run_dir = local_run_dir(storage_path, name)
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    if remote and result.checkpoint is not None:
        # the driver's later steps (bundle, plots, registry) read the final checkpoint from local disk
        local = run_dir / Path(result.checkpoint.path).name
        result.checkpoint.to_directory(str(local))
        checkpoint = str(local)
    run_uri = storage.join(storage_path, name) if remote else None
    return TrainOutcome(
        dict(result.metrics or {}), checkpoint, str(run_dir), time.monotonic() - start, run_uri
    )


def launch_stage(
    loop: Callable[[dict[str, Any]], None],
    config: Config,
    scaling: ScalingSection,
    name: str,
    run_id: str | None,
    stage_config: dict[str, Any],
    events_path: str | os.PathLike | None = None,
    max_failures: int | None = None,
) -> TrainOutcome:
    """Run one training stage's `loop` on Ray Train and return its outcome, which has a checkpoint.

    The loop gets `stage_config` plus the keys every stage's loop reads: `config` (plain data, paths
    absolute), `tracking_uri` and `run_id` (None when `run_id` is None: no tracking) and `mailbox`
    (`facepipe.train.mailbox`: events for `events_path`, non-finite records). Raises the
    `NonFiniteLossError` a worker recorded, or `FacepipeError` when the run fails or ends without a
    checkpoint. `max_failures` defaults to `train_backbone.max_failures`.
    """
    loop_config = {
        "config": worker_config(config),
        "tracking_uri": absolute_tracking_uri(config.tracking.tracking_uri) if run_id else None,
        "run_id": run_id,
        **stage_config,
    }
    if max_failures is None:
        max_failures = config.train_backbone.max_failures
    with ray_session(scaling.address), Mailbox(events_path) as mailbox:
        loop_config.update(mailbox=mailbox.handle, keep_events=events_path is not None)
        outcome = run_training(loop, loop_config, scaling, config.paths.runs, name, max_failures=max_failures)
    mailbox.raise_nonfinite()  # before the checkpoint check: a stop at step 1 leaves none
    if outcome.checkpoint_path is None:
        raise FacepipeError(f"training run {name} finished without a checkpoint")
    return outcome


def _root_message(err: BaseException) -> str:
    """The innermost cause's message: Ray wraps a worker's exception in several layers."""
    seen = err
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return f"{type(seen).__name__}: {seen}"


# ---------------------------------------------------------------------------------------------
# Helpers for use inside a worker loop
# ---------------------------------------------------------------------------------------------


def worker_context() -> tuple[int, int, str]:
    """(rank, world size, node id) of the calling Ray Train worker."""
    import ray
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.get_runtime_context().get_node_id()


def set_threads() -> None:
    """Cap torch's intra-op threads to the CPUs this worker was given."""
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
