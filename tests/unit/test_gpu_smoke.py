"""bench/gpu_smoke.py: the CPU dry run covers every stage; without CUDA the default run says so, exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_smoke.py"


def run_script(*args: str, hide_cuda: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the no-CUDA path on any machine, GPU ones included
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_without_cuda_prints_the_message_and_exits_0() -> None:
    out = run_script(hide_cuda=True)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)  # one JSON object and nothing else on stdout
    assert result["cuda"] is False
    assert "no CUDA device" in result["message"]


@pytest.mark.integration
@pytest.mark.slow
def test_cpu_dry_run_measures_every_stage(tmp_path: Path) -> None:
    # one head: every head's stage runs on Ray in the integration tests; this checks the smoke's own path
    out = run_script(
        "--device", "cpu", "--keep", str(tmp_path / "work"), "--methods", "probface", timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout)
    stages = result["stages"]
    expected = {"backbone", "finetune", "evaluate", "head_probface"}
    assert set(stages) == expected
    for name, numbers in stages.items():
        assert numbers["samples_s"] > 0, (name, numbers)
        assert numbers["peak_gpu_mb"] is None, name  # CPU: nothing to report
    for name in expected - {"evaluate"}:
        assert stages[name]["steps"] == result["steps"], name
    assert stages["backbone"]["partial_fc"] is True and stages["backbone"]["amp"] is False
