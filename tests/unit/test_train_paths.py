"""What the training stages hand to Ray workers: absolute paths and tracking stores; `--metrics-out`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from facepipe.config import Config
from facepipe.train.ray_job import absolute_tracking_uri, worker_config


def test_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{here / 'mlflow.db'}"
    assert (
        absolute_tracking_uri("sqlite:///db/m.db?timeout=5") == f"sqlite:///{here / 'db' / 'm.db'}?timeout=5"
    )
    assert absolute_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_tracking_uri("sqlite:///:memory:") == "sqlite:///:memory:"
    assert absolute_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert absolute_tracking_uri("mlruns") == str(here / "mlruns")
    assert absolute_tracking_uri("file:mlruns") == (here / "mlruns").as_uri()
    assert absolute_tracking_uri("file:///abs/mlruns") == "file:///abs/mlruns"
    assert absolute_tracking_uri(None) is None


def test_worker_config_has_absolute_paths_and_leaves_the_driver_config_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Config()  # the defaults are params.yaml's relative paths
    config.paths.raw = "/already/absolute"
    data = worker_config(config)
    here = tmp_path.resolve()
    assert data["paths"]["features"] == str(here / "data" / "features")
    assert data["paths"]["shards"] == str(here / "data" / "shards")
    assert data["paths"]["raw"] == "/already/absolute"
    assert data["tracking"]["tracking_uri"] == f"sqlite:///{here / 'mlflow.db'}"
    assert config.paths.features == "data/features"  # what MLflow logs stays as the user wrote it
    assert Config.model_validate(data).paths.runs == str(here / "runs")


def test_a_process_in_another_directory_finds_the_drivers_run(tmp_path, monkeypatch):
    """The failure the workers had: a relative sqlite URI opened an empty database elsewhere."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = "sqlite:///mlflow.db"
    # the driver creates the run through the absolute form: MLflow caches stores per URI string in a
    # process, so a relative URI here could reuse another test's database
    mlc = MlflowClient(tracking_uri=absolute_tracking_uri(uri))
    run_id = mlc.create_run(mlc.create_experiment("e")).info.run_id
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    probe = (
        "import sys; from mlflow import MlflowClient; "
        "c = MlflowClient(tracking_uri=sys.argv[1]); c.log_metric(sys.argv[2], 'x', 1.0); print('ok')"
    )

    def worker(u: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", probe, u, run_id],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert worker(uri).returncode != 0  # relative: another database, "Run ... not found"
    assert worker(absolute_tracking_uri(uri)).returncode == 0
    assert mlc.get_run(run_id).data.metrics["x"] == 1.0


def test_metrics_out_is_parsed_and_written(tmp_path):
    from facepipe.cli import build_parser
    from facepipe.commands.train import write_metrics_file
    from facepipe.train.stage import StageResult

    for stage in ("backbone", "uncertainty"):
        args = build_parser().parse_args(["train", stage, "--metrics-out", "m.json", "seed=1"])
        assert args.metrics_out == "m.json" and args.overrides == ["seed=1"]
    result = StageResult("run", Path("b"), {"accuracy": 0.9, "val/lfw/accuracy": 0.8, "note": "x"})
    result.model = {"name": "facepipe-backbone", "version": "3"}
    target = tmp_path / "metrics" / "backbone.json"
    write_metrics_file(str(target), result)
    assert json.loads(target.read_text()) == {"accuracy": 0.9, "val/lfw/accuracy": 0.8, "model_version": 3}
    assert [p.name for p in target.parent.iterdir()] == ["backbone.json"]  # no temp file left


@pytest.mark.parametrize("stage", ["backbone", "uncertainty"])
def test_help_lists_metrics_out(stage, capsys):
    from facepipe.cli import main

    with pytest.raises(SystemExit):
        main(["train", stage, "--help"])
    assert "--metrics-out" in capsys.readouterr().out
