"""Benchmark: backbone training throughput through Ray Train (one worker) vs a plain single-process loop.

    python bench/train.py [--shards DIR] [--steps 40] [--batch 64] [--input-size N] [--threads 2]

Both sides train the same model (registry backbone + margin head, AdamW, warmup/poly schedule,
gradient clipping) on the same shards with the same `ShardLoader`; throughput is measured from the end
of the first step to the last one (start-up excluded on both sides). Ray Train's run does what a real
run does except MLflow and verification: its controller polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
(set low here). Prints one JSON object: `samples_s` (Ray Train), `baseline_samples_s` (plain loop),
`ratio` (goal >= 0.9) and `ray_wall_s` (the whole Ray run, start-up included).
Without --shards it generates a small sample dataset first.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def _thread_env(threads: int) -> None:
    """The plain loop gets the thread settings `run_training` gives Ray workers (before torch loads)."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def make_dataset(root: Path) -> Path:
    from facepipe.data.decode.job import decode_dataset
    from facepipe.data.synth.generate import SynthConfig, generate

    generate(root / "raw", SynthConfig(identities=100, images_per_identity=10, pairs=100, size=112))
    decode_dataset([root / "raw"], root / "shards", workers=1)
    return root / "shards"


def plain_loop(config, data, steps: int, threads: int) -> float:
    import torch

    from facepipe.data.loader import ShardLoader
    from facepipe.models.preprocess import to_model_input
    from facepipe.models.registry import build_backbone, build_margin_head
    from facepipe.train.backbone import _objective_module, margin_head_kwargs
    from facepipe.train.loop import build_optimizer, build_scheduler

    torch.set_num_threads(threads)
    tb = config.train_backbone
    torch.manual_seed(tb.seed)
    backbone = build_backbone(
        tb.backbone.name, embedding_size=tb.backbone.embedding_size, input_size=list(tb.backbone.input_size)
    )
    head = build_margin_head(
        tb.margin.name,
        embedding_size=backbone.embedding_size,
        num_classes=data.num_classes,
        **margin_head_kwargs(tb.margin.name, tb.margin.s, tb.margin.m, tb.margin.extra),
    )
    # the same memory format the Ray worker trains in (NHWC by default)
    memory_format = torch.channels_last if tb.channels_last else torch.contiguous_format
    backbone = backbone.to(memory_format=memory_format)
    objective = _objective_module(backbone, head)
    optimizer = build_optimizer([p for p in objective.parameters() if p.requires_grad], tb.optim)
    scheduler = build_scheduler(optimizer, steps, 0, tb.optim.poly_power)
    loader = ShardLoader(
        data.shards,
        tb.batch_size,
        tuple(tb.backbone.input_size),
        data.color_order,
        seed=tb.seed,
        workers=tb.loader.workers,
        prefetch=tb.loader.prefetch,
    )
    objective.train()
    step, start, samples = 0, None, 0
    with loader:
        while step < steps:
            for batch in loader.epoch(step // len(loader), start_batch=step % len(loader)):
                images = to_model_input(batch.images, None, memory_format)  # as the stage's `place`
                loss = objective(images, batch.labels, False)
                if not torch.isfinite(loss.detach()).all():
                    raise RuntimeError("non-finite loss")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(objective.parameters(), tb.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                if start is None:
                    start = time.monotonic()
                else:
                    samples += len(batch.labels)
                if step >= steps:
                    break
    return samples / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=None, help="default: the configured backbone's")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    _thread_env(args.threads)

    from facepipe.config import Config
    from facepipe.train.backbone import train_backbone
    from facepipe.train.stage import resolve_data

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = args.shards or make_dataset(tmp)
        config = Config()
        config.paths.runs = str(tmp / "runs")
        tb = config.train_backbone
        if args.input_size:
            tb.backbone.input_size = (args.input_size, args.input_size)
        tb.batch_size = args.batch
        tb.max_steps = args.steps
        tb.epochs = 1000
        tb.verify_every_epoch = False
        tb.checkpoint_every_steps = 10**9
        tb.optim.warmup_epochs = 0.0
        tb.scaling.num_workers = 1
        tb.scaling.cpus_per_worker = args.threads
        data = resolve_data(shards)
        baseline = plain_loop(config, data, args.steps, args.threads)
        t0 = time.monotonic()
        import ray

        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
        try:
            # the stage's summary goes to stderr: stdout carries only this script's JSON
            with contextlib.redirect_stdout(sys.stderr):
                result = train_backbone(config, shards, run_name="bench", track=False)
        finally:
            ray.shutdown()
        wall = time.monotonic() - t0
    ray_rate = result.metrics["train/samples_s"]
    print(
        json.dumps(
            {
                "steps": args.steps,
                "batch": args.batch,
                "backbone": tb.backbone.name,
                "input_size": tb.backbone.input_size[0],
                "samples_s": round(ray_rate, 1),
                "baseline_samples_s": round(baseline, 1),
                "ratio": round(ray_rate / baseline, 3),
                "ray_wall_s": round(wall, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
