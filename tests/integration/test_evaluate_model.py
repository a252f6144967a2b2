"""From params.yaml with relative paths to a benchmark report, the way dvc.yaml runs the stages.

Backbone and ProbFace head train on a real Ray cluster whose workers run in their own directories, with
`paths.*` and `sqlite:///mlflow.db` relative to the driver's directory (what broke before: the head's
feature cache was not found and the workers logged into another database); then `facepipe evaluate`
scores the registered champion on the pair tables.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import small_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_relative_params_train_and_evaluate_registered_model(
    ray_cluster, sample_dataset, tmp_path, monkeypatch
):
    from facepipe import tracking
    from facepipe.cli import main
    from facepipe.config import dump_config, load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(sample_dataset)  # data/shards, data/raw as in params.yaml
    config = small_config(sample_dataset, tmp_path, None)
    config.paths.shards, config.paths.raw = "data/shards", "data/raw"
    config.paths.runs, config.paths.features, config.paths.reports = "runs", "cache/features", "reports"
    config.tracking.tracking_uri, config.tracking.artifact_location = "sqlite:///mlflow.db", "artifacts"
    config.train_backbone.scaling.num_workers = 1
    config.train_backbone.max_steps = 6
    config.train_backbone.verify_every_epoch = False
    config.train_uncertainty.max_steps = 4
    config.eval.folds = 5
    (tmp_path / "params.yaml").write_text(dump_config(config))
    common = ["--config", "params.yaml", "--address", ray_cluster.address]

    assert main(["train", "backbone", *common, "--name", "bb", "--metrics-out", "metrics/backbone.json"]) == 0
    saved = json.loads((tmp_path / "metrics" / "backbone.json").read_text())
    assert saved["model_version"] == 1 and "train/loss" in saved
    config = load_config("params.yaml")
    mlc = tracking.client(config.tracking)
    version = mlc.get_model_version_by_alias("facepipe-backbone", "champion")
    history = mlc.get_metric_history(version.run_id, "train/loss")
    assert history, "the Ray worker's per-step metrics are not in this database"

    head = [
        "train",
        "uncertainty",
        "--method",
        "probface",
        "--backbone",
        "models:/facepipe-backbone@champion",
    ]
    argv = [*head, *common, "--shards", "data/shards", "--name", "pf", "--metrics-out", "metrics/pf.json"]
    assert main(argv) == 0
    assert list((tmp_path / "cache" / "features").glob("*/features-*.parquet"))  # the relative cache
    head_metrics = json.loads((tmp_path / "metrics" / "pf.json").read_text())
    assert 0.0 <= head_metrics["accuracy"] <= 1.0

    out = "reports/benchmark/probface"
    argv = ["evaluate", "--model", "models:/facepipe-probface@champion", "--shards", "data/shards"]
    assert main([*argv, "--out", out, "--config", "params.yaml"]) == 0
    summary = json.loads((tmp_path / out / "metrics.json").read_text())
    assert summary, "no pair tables were scored"
    for name, table in summary.items():
        assert 0.0 <= table["accuracy"] <= 1.0
        assert "mls_probface_accuracy" in table and "risk_cosine_reject_30" in table
        assert (tmp_path / out / "plots" / name / "risk.png").is_file()
        assert (tmp_path / out / name / "metrics.json").is_file()
    assert any("spearman_uncertainty_degradation" in t for t in summary.values())
