"""A non-finite loss in the uncertainty-head and fine-tune stages stops the run once, naming the batch.

The loss is driven non-finite through the config (no patched loss): a learning rate of 1e30 makes the
head's first update overflow its weights, and a centre-term weight beyond float32 makes the fine-tune
loss infinite. `max_failures` stays above 0, so a worker that raised would be restarted by Ray; the
events file shows the loop started exactly once per worker.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from facepipe.errors import NonFiniteLossError
from facepipe.train.mailbox import read_events
from tests.integration.conftest import small_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WHERE = re.compile(r"epoch (\d+), batch (\d+) \(step (\d+), rank (\d+)\)")


@pytest.fixture(scope="module")
def backbone_bundle(sample_dataset, tmp_path_factory) -> Path:
    """A backbone bundle in the backbone stage's format (untrained weights, random class centres).

    These stages only need a bundle to start from; training one through Ray would double the runtime.
    """
    import torch

    from facepipe.models.bundle import BundleInfo, save_bundle
    from facepipe.models.registry import build_backbone
    from facepipe.train.stage import resolve_data

    data = resolve_data(sample_dataset / "shards")
    torch.manual_seed(0)
    kwargs = {"embedding_size": 64, "input_size": [32, 32]}
    backbone = build_backbone("iresnet_tiny", **kwargs)
    info = BundleInfo(
        "iresnet_tiny",
        kwargs,
        64,
        (32, 32),
        data.color_order,
        data.num_classes,
        "cosface",
        {"margin_s": 30.0},
    )
    centres = torch.nn.functional.normalize(torch.randn(data.num_classes, 64), dim=1)
    return save_bundle(tmp_path_factory.mktemp("nonfinite") / "bundle", backbone, info, centres)


@pytest.fixture(scope="module")
def fine_grained_shards(sample_dataset, tmp_path_factory) -> Path:
    """The sample dataset decoded into small row groups: enough batch windows for two workers."""
    from facepipe.data.decode.job import decode_dataset

    out = tmp_path_factory.mktemp("nonfinite-shards") / "shards"
    decode_dataset([sample_dataset / "raw"], out, row_group_bytes=64 << 10)
    return out


def assert_stopped_once(err: pytest.ExceptionInfo, events_path: Path, workers: int) -> int:
    """The error names epoch/batch/step; each worker started once; steps ran up to the bad one only."""
    found = WHERE.search(str(err.value))
    assert found, str(err.value)
    step = int(found.group(3))
    events = read_events(events_path)
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == workers, starts  # one attempt: no restart by FailureConfig
    assert [e["step"] for e in starts] == [0] * workers
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(1, step))  # nothing ran past the bad batch
    bad = [e for e in events if e["event"] == "nonfinite"]
    assert bad and all(e["step"] == step for e in bad)
    return step


def test_head_stage_stops_on_nonfinite_loss_without_retry(
    ray_cluster, sample_dataset, fine_grained_shards, backbone_bundle, tmp_path
):
    from facepipe.train.head import train_uncertainty

    config = small_config(sample_dataset, tmp_path, ray_cluster.address)
    config.paths.shards = str(fine_grained_shards)
    config.train_backbone.max_failures = 2  # a raising worker would be retried twice
    tu = config.train_uncertainty
    tu.scaling.num_workers = 2  # both ranks must stop at the same step (a collective would hang otherwise)
    tu.optim.lr = 1e30  # the first update throws the head's weights to ~1e30: log σ² overflows
    tu.max_steps = 6
    events_path = tmp_path / "head.jsonl"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at batch epoch 0") as err:
        train_uncertainty(
            config,
            method="probface",
            backbone_uri=str(backbone_bundle),
            run_name="head-nan",
            events_path=events_path,
            register=False,
            track=False,
        )
    step = assert_stopped_once(err, events_path, workers=2)
    assert 1 < step <= tu.max_steps  # the first loss was finite: it is the update that diverged
    # the records reach the driver through the mailbox, not a folder another node could not read
    assert not (Path(config.paths.runs) / "head-nan" / "errors").exists()
    assert any(e["event"] == "nonfinite" and e["rank"] == 0 for e in read_events(events_path))


def test_finetune_stage_stops_on_nonfinite_loss_without_retry(
    ray_cluster, sample_dataset, backbone_bundle, tmp_path
):
    from facepipe.train.finetune import finetune

    config = small_config(sample_dataset, tmp_path, ray_cluster.address)
    config.train_backbone.max_failures = 2
    ft = config.finetune
    ft.centre_weight = 1e39  # beyond float32: the centre term, and so the loss, is infinite
    ft.classes_per_batch = 6
    ft.max_steps = 4
    events_path = tmp_path / "finetune.jsonl"
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, batch 0 \(step 1, rank 0\)") as err:
        finetune(
            config,
            backbone_uri=str(backbone_bundle),
            run_name="finetune-nan",
            events_path=events_path,
            register=False,
            track=False,
        )
    assert assert_stopped_once(err, events_path, workers=1) == 1
