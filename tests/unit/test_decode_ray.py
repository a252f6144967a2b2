"""The per-range function runs as a Ray task and gives the same shards as the local pool."""

from __future__ import annotations

import pytest

from facepipe.data.decode.job import convert_range, decode_dataset
from tests.unit.test_decode import make_source, shard_bytes

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # starts a local Ray instance (~20 s here)


def test_ray_tasks_match_local_processes(tmp_path):
    ray = pytest.importorskip("ray")
    src = make_source(tmp_path / "src", n_classes=5, per_class=4)
    local = decode_dataset([src], tmp_path / "local", target_bytes=4_000, workers=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(convert_range)
        manifest = decode_dataset(
            [src],
            tmp_path / "ray",
            target_bytes=4_000,
            runner=lambda fn, tasks: ray.get([remote.remote(task) for task in tasks]),
        )
    finally:
        ray.shutdown()
    assert len(local["shards"]) > 1
    assert manifest["shards"] == local["shards"]
    assert shard_bytes(tmp_path / "ray") == shard_bytes(tmp_path / "local")
