"""A worker killed mid-run (by pid) resumes from its last checkpoint: no step lost or repeated beyond it.

Run with PartialFC, so each worker's shard of the class centres is checkpointed and restored too.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from facepipe.train.backbone import train_backbone
from facepipe.train.mailbox import read_events
from tests.integration.conftest import assert_resumed_once, small_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, sample_dataset, tmp_path):
    config = small_config(sample_dataset, tmp_path, ray_cluster.address)
    tb = config.train_backbone
    tb.max_steps = 30  # room for the kill to land after a registered checkpoint, even on a fast machine
    tb.epochs = 8  # 5 steps an epoch on the sample dataset: enough for max_steps
    tb.checkpoint_every_steps = 3
    tb.verify_every_epoch = False
    tb.partial_fc_threshold = 0  # class centres sharded over the two workers (PartialFC), saved per rank
    tb.partial_fc_sample_rate = 0.5
    events_path = tmp_path / "events.jsonl"
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = train_backbone(
                config, run_name="fault", events_path=events_path, register=False
            )
        except BaseException as err:  # noqa: BLE001 - surfaced by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=train)
    thread.start()
    # wait for the first checkpoint and a few steps past it, then kill rank 1's process
    deadline = time.monotonic() + 300
    victim = None
    # Ray's controller collects a reported checkpoint only at its next health check (0.2 s here): a kill
    # right after the worker logs one may precede its registration, so wait until it is safely known
    first_seen: dict[int, float] = {}
    while time.monotonic() < deadline and thread.is_alive():
        events = read_events(events_path)
        checkpoints = [e["step"] for e in events if e["event"] == "checkpoint"]
        steps = [e["step"] for e in events if e["event"] == "step"]
        for step in checkpoints:
            first_seen.setdefault(step, time.monotonic())
        settled = checkpoints and time.monotonic() - first_seen[checkpoints[0]] >= 1.0
        if settled and steps and steps[-1] >= checkpoints[-1] + 1 and steps[-1] < tb.max_steps - 2:
            victim = next(e["pid"] for e in events if e["event"] == "start" and e["rank"] == 1)
            os.kill(victim, signal.SIGKILL)
            break
        time.sleep(0.05)
    assert victim is not None, "never reached a point to kill a worker"
    thread.join(timeout=400)
    assert not thread.is_alive(), "training did not finish after the kill"
    assert "error" not in outcome, outcome.get("error")

    events = read_events(events_path)
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 4, starts  # two workers, two attempts
    resumed_at = max(e["step"] for e in starts)
    assert resumed_at > 0 and all(e["step"] == resumed_at for e in starts[2:])
    checkpoints = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert resumed_at in checkpoints or resumed_at % tb.checkpoint_every_steps == 0

    steps = [e["step"] for e in events if e["event"] == "step"]
    assert_resumed_once(events, resumed_at, tb.max_steps)
    assert set(steps) == set(range(1, tb.max_steps + 1))
    result = outcome["result"]
    assert result.metrics["step"] == tb.max_steps

    # the per-rank centre shards were joined into the bundle in class order
    from facepipe.models.bundle import load_bundle

    _, info, centres = load_bundle(result.bundle_dir)
    assert tuple(centres.shape) == (info.num_classes, info.embedding_size)
    assert sorted(p.name for p in result.bundle_dir.parent.glob("centres-rank*.pt")) == [
        "centres-rank0.pt",
        "centres-rank1.pt",
    ]


def test_non_finite_loss_stops_with_the_batch_named(ray_cluster, sample_dataset, tmp_path):
    from facepipe.errors import NonFiniteLossError

    config = small_config(sample_dataset, tmp_path, ray_cluster.address)
    config.train_backbone.scaling.num_workers = 1
    config.train_backbone.margin.s = 1e39  # beyond float32: logits of ±inf, the first loss is NaN
    config.train_backbone.max_steps = 3
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, batch 0 \(step 1, rank 0\)"):
        train_backbone(config, run_name="nan", register=False, track=False)
