"""GPU smoke run: every training stage and evaluation for a few steps on a generated dataset.

    python bench/gpu_smoke.py [--device cuda|cpu] [--steps N] [--keep DIR] [--methods pfe,probface]

On a CUDA machine (the default device) it generates a small sample dataset, decodes it, and runs
through Ray Train (one worker, `use_gpu=True`): the backbone stage with AMP and PartialFC, every
uncertainty head registered in `facepipe.uncertainty.registry`, fine-tuning, then evaluation (a pair
table embedded by the fine-tuned backbone). Prints one JSON object with, per stage, `samples_s`
(steady state, first step excluded, as the stage loop measures it), `peak_gpu_mb`
(`torch.cuda.max_memory_allocated` in the process that ran the stage) and `wall_s`.

Without a CUDA device the default run prints `{"cuda": false, "message": ...}` and exits 0.
`--device cpu` runs the very same stage sequence on CPU with tiny sizes (AMP off, peak memory null):
a dry run of the code path that the tests use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

NO_CUDA = {"cuda": False, "message": "no CUDA device: nothing to measure; run on a GPU machine"}

# Sizes per device: the CUDA run uses the production backbone shape; the CPU dry run the tiny one.
SIZES: dict[str, dict[str, Any]] = {
    "cuda": {
        "identities": 200,
        "images": 10,
        "pairs": 200,
        "image_size": 112,
        "backbone": "iresnet50",
        "input_size": 112,
        "embedding": 512,
        "batch": 128,
        "steps": 20,
        "cpus": 4,
    },
    "cpu": {
        "identities": 16,
        "images": 8,
        "pairs": 40,
        "image_size": 32,
        "backbone": "iresnet_tiny",
        "input_size": 32,
        "embedding": 32,
        "batch": 16,
        "steps": 3,
        "cpus": 2,
    },
}


def make_dataset(root: Path, size: dict[str, Any]) -> Path:
    """Generated InsightFace-layout data decoded into shards (what `facepipe synth` + `decode` write)."""
    from facepipe.data.decode.job import decode_dataset
    from facepipe.data.synth.generate import SynthConfig, generate

    synth = SynthConfig(
        identities=size["identities"],
        images_per_identity=size["images"],
        pairs=size["pairs"],
        size=size["image_size"],
    )
    generate(root / "raw", synth)
    decode_dataset([root / "raw"], root / "shards", workers=1)
    return root / "shards"


def smoke_config(root: Path, size: dict[str, Any], steps: int, use_gpu: bool) -> Any:
    """A Config whose stages each stop after `steps` optimiser steps, untracked, one Ray worker."""
    from facepipe.config import Config

    config = Config()
    config.paths.shards = str(root / "shards")
    config.paths.raw = str(root / "raw")
    config.paths.runs = str(root / "runs")
    config.paths.features = str(root / "features")
    tb = config.train_backbone
    tb.backbone.name = size["backbone"]
    tb.backbone.input_size = (size["input_size"], size["input_size"])
    tb.backbone.embedding_size = size["embedding"]
    tb.batch_size = size["batch"]
    tb.amp = True  # the loop turns it on for CUDA devices only
    tb.partial_fc_threshold = 0  # any class count: PartialFC is always on
    tb.verify_every_epoch = False
    tb.checkpoint_every_steps = 10**9
    tb.optim.warmup_epochs = 0.0
    tb.loader.workers = 1
    tu, ft = config.train_uncertainty, config.finetune
    tu.classes_per_batch, tu.images_per_class = max(size["batch"] // 4, 2), 4
    tu.batch_size = size["batch"]
    ft.classes_per_batch = max(size["batch"] // ft.images_per_class, 2)
    # epochs high, max_steps low: every stage runs exactly `steps` steps whatever the epoch length
    for section in (tb, tu, ft):
        section.epochs, section.max_steps = 1000, steps
    for scaling in (tb.scaling, tu.scaling, ft.scaling):
        scaling.num_workers, scaling.use_gpu = 1, use_gpu
        scaling.cpus_per_worker = size["cpus"] // 2
    return config


class StageMeter:
    """Captures each Ray stage's outcome and its worker's peak GPU memory without touching the stages.

    `StageDriver.run` keeps the Ray outcome (whose final metrics carry `train/samples_s`) to itself,
    so the driver's `launch_stage` is wrapped; the worker loop is wrapped too, to read
    `max_memory_allocated` in the worker process, where the stage ran.
    """

    def __init__(self, peak_dir: Path) -> None:
        import facepipe.train.stage as stage_module

        self.stage_module = stage_module
        self.original = stage_module.launch_stage
        self.peak_dir = peak_dir
        self.outcome: Any = None

    def __enter__(self) -> StageMeter:
        self.stage_module.launch_stage = self.launch
        return self

    def __exit__(self, *exc: object) -> None:
        self.stage_module.launch_stage = self.original

    def launch(self, loop: Any, *args: Any, **kwargs: Any) -> Any:
        for old in self.peak_dir.glob("*.json"):
            old.unlink()
        self.outcome = self.original(measured_loop(loop, str(self.peak_dir)), *args, **kwargs)
        return self.outcome

    def peak_mb(self) -> float | None:
        peaks = [json.loads(p.read_text())["peak"] for p in self.peak_dir.glob("*.json")]
        peaks = [p for p in peaks if p is not None]
        return round(max(peaks) / 2**20, 1) if peaks else None


def measured_loop(loop: Any, peak_dir: str) -> Any:
    """`loop` plus a record of the worker's peak GPU memory (a file: the smoke run is one node)."""

    def run(loop_config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch
        import torch

        device = ray.train.torch.get_device()
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        loop(loop_config)
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        rank = ray.train.get_context().get_world_rank()
        Path(peak_dir, f"{rank}.json").write_text(json.dumps({"peak": peak}))

    return run


def train_stages(config: Any, shards: Path, root: Path, methods: list[str]) -> tuple[dict[str, Any], Path]:
    """Backbone, the heads of `methods`, fine-tune; their numbers and the fine-tuned bundle."""
    from facepipe.train.backbone import train_backbone
    from facepipe.train.finetune import finetune
    from facepipe.train.head import train_uncertainty

    peak_dir = root / "peaks"
    peak_dir.mkdir()
    stages: dict[str, Any] = {}
    options = {"register": False, "track": False}
    with StageMeter(peak_dir) as meter:

        def measure(name: str, run: Any) -> Any:
            t0 = time.monotonic()
            result = run()
            stages[name] = {
                "samples_s": round(float(meter.outcome.metrics.get("train/samples_s", 0.0)), 2),
                "peak_gpu_mb": meter.peak_mb(),
                "steps": int(meter.outcome.metrics.get("step", 0)),
                "wall_s": round(time.monotonic() - t0, 1),
            }
            return result

        backbone = measure(
            "backbone", lambda: train_backbone(config, shards, run_name="smoke-backbone", **options)
        )
        stages["backbone"]["amp"] = config.train_backbone.amp and config.train_backbone.scaling.use_gpu
        stages["backbone"]["partial_fc"] = True
        bundle = str(backbone.bundle_dir)
        for method in methods:
            measure(
                f"head_{method}",
                lambda m=method: train_uncertainty(
                    config, shards, method=m, backbone_uri=bundle, run_name=f"smoke-{m}", **options
                ),
            )
        tuned = measure(
            "finetune",
            lambda: finetune(config, shards, backbone_uri=bundle, run_name="smoke-finetune", **options),
        )
    return stages, tuned.bundle_dir


def evaluate_stage(bundle: Path, shards: Path, device: str) -> dict[str, Any]:
    """Embed one pair table (both images and their mirrors) with the fine-tuned backbone."""
    import torch

    from facepipe.data.dataset import Dataset
    from facepipe.models.bundle import load_bundle
    from facepipe.models.embed import embed_pair_table

    backbone, info, _ = load_bundle(bundle, device=device)
    dataset = Dataset.open(shards)
    table = next(iter(dataset.pair_tables.values()))
    size, colour = tuple(info.input_size), dataset.color_order
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = embed_pair_table(backbone, table, size, colour)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    images = 2 * len(out["embedding"])  # each image and its mirror
    peak = round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None
    return {
        "samples_s": round(images / seconds, 2),
        "peak_gpu_mb": peak,
        "pairs": len(out["issame"]),
        "wall_s": round(seconds, 1),
    }


def run_smoke(
    device: str, steps: int | None, keep: Path | None, methods: list[str] | None = None
) -> dict[str, Any]:
    import ray
    import torch

    from facepipe.uncertainty.registry import method_names

    methods = methods or method_names()
    size = SIZES[device]
    steps = steps or size["steps"]
    with contextlib.ExitStack() as stack:
        root = keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-smoke-")))
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        shards = make_dataset(root, size)
        data_s = time.monotonic() - t0
        config = smoke_config(root, size, steps, use_gpu=device == "cuda")
        ray.init(
            num_cpus=size["cpus"],
            num_gpus=1 if device == "cuda" else 0,
            include_dashboard=False,
            log_to_driver=False,
        )
        try:
            # the stages' summaries go to stderr: stdout carries only this script's JSON
            with contextlib.redirect_stdout(sys.stderr):
                stages, tuned = train_stages(config, shards, root, methods)
        finally:
            ray.shutdown()
        stages["evaluate"] = evaluate_stage(tuned, shards, device)
    result: dict[str, Any] = {
        "cuda": device == "cuda",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "backbone": size["backbone"],
        "input_size": size["input_size"],
        "batch": size["batch"],
        "steps": steps,
        "dataset": {k: size[k] for k in ("identities", "images", "pairs")},
        "data_s": round(data_s, 1),
        "stages": stages,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=None, help="steps per stage (default: per device)")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp dir)")
    parser.add_argument(
        "--methods",
        default=None,
        help="uncertainty heads to run (comma-separated; default: every registered one)",
    )
    args = parser.parse_args(argv)
    methods = args.methods.split(",") if args.methods else None
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps(NO_CUDA))
        return 0
    print(json.dumps(run_smoke(args.device, args.steps, args.keep, methods)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
