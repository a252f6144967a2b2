"""`dvc repro` on the repository's dvc.yaml, in a fresh git + DVC project with a local remote.

The stages run for real on a tiny sample dataset: a first repro builds, a second does nothing, a
changed parameter reruns only the stages that depend on it, and metrics/plots are readable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

TINY = {
    "synth": {"identities": 16, "images_per_identity": 4, "pairs": 40, "workers": 1, "protocol_subjects": 4},
    "decode": {"workers": 1, "target_mb": 1},
    "train_backbone": {"epochs": 1, "batch_size": 32, "scaling": {"num_workers": 1}},
    "train_uncertainty": {"epochs": 1, "classes_per_batch": 8, "images_per_class": 2},
}


# the whole chain up to one uncertainty head and its benchmark (the other heads are the same stage
# with another --method)
TARGETS = ["benchmark@probface"]


def merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict):
            merge(base.setdefault(key, {}), value)
        else:
            base[key] = value
    return base


def dvc(project: Path, *args: str, check: bool = True) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def set_param(project: Path, section: str, key: str, value) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def ran(output: str) -> set[str]:
    """Stages `dvc repro` executed (it prints "Running stage 'NAME':")."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture()
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    # absolute: Ray Train workers do not run in the project folder, and facepipe's training stages pass
    # these two to them as they are (dvc.yaml's outs must stay relative, and these are not outs)
    params["tracking"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    params["paths"]["features"] = str(root / "data" / "features")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["init", "-q"], ["config", "user.email", "ci@example.com"], ["config", "user.name", "ci"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    dvc(root, "init", "-q")
    dvc(root, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    return root


def test_repro_builds_then_is_idempotent_then_reruns_only_dependents(project, tmp_path):
    first = dvc(project, "repro", *TARGETS)
    assert ran(first) == {"sample", "decode", "train-backbone", "train-probface", "benchmark@probface"}, first
    assert (project / "data" / "shards" / "manifest.json").is_file()
    assert (project / "data" / "raw" / "train.rec").is_file()
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert lock["decode"]["params"]["params.yaml"]["decode.target_mb"] == 1
    # the benchmark's metrics file is what `dvc metrics show` reads
    metrics = dvc(project, "metrics", "show", "--json")
    assert "accuracy" in metrics and "reports/benchmark/probface/metrics.json" in metrics, metrics
    # pushes to the local remote; a clean status afterwards
    dvc(project, "push")
    assert any((tmp_path / "remote").rglob("*"))
    assert "up to date" in dvc(project, "status", "--with-deps", *TARGETS).lower()

    second = dvc(project, "repro", *TARGETS)
    assert ran(second) == set(), second

    # a head parameter reruns the head and its benchmark only
    set_param(project, "train_uncertainty", "epochs", 2)
    third = dvc(project, "repro", *TARGETS)
    assert ran(third) == {"train-probface", "benchmark@probface"}, third
    plots = dvc(project, "plots", "show", "--json")
    assert "runs/backbone/plots/roc.png" in plots and "runs/probface/plots" in plots, plots
    assert "reports/benchmark/probface/plots" in plots, plots

    # a decode parameter reruns decode (and what reads the shards), never the sample generator
    set_param(project, "decode", "target_mb", 2)
    assert "decode" in dvc(project, "status", "decode")
    fourth = dvc(project, "repro", "decode")
    assert ran(fourth) == {"decode"}, fourth
    assert "train-backbone" in dvc(project, "status", "--with-deps", *TARGETS)
