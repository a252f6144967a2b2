"""MLflow on SQLite: runs carry versions and config; models register with aliases and load back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facepipe import tracking
from facepipe.config import Config
from facepipe.models.bundle import BundleInfo, save_bundle

pytestmark = pytest.mark.integration


@pytest.fixture
def config(tmp_path):
    config = Config()
    config.tracking.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config.tracking.artifact_location = str(tmp_path / "artifacts")
    config.tracking.experiment = "tracking-test"
    return config


def _bundle(tmp_path, seed: int):
    from facepipe.models.registry import build_backbone

    torch.manual_seed(seed)
    kwargs = {"embedding_size": 16, "input_size": [32, 32]}
    backbone = build_backbone("iresnet_tiny", **kwargs).eval()
    info = BundleInfo("iresnet_tiny", kwargs, 16, (32, 32), "RGB", 5, "cosface")
    return backbone, save_bundle(tmp_path / f"bundle{seed}", backbone, info, torch.randn(5, 16))


def test_data_version_reads_manifest_and_dvc(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    (tmp_path / "shards.dvc").write_text("outs:\n- md5: abc123.dir\n  path: shards\n")
    tags = tracking.data_version(shards)
    assert tags["data.dvc_md5"] == "abc123.dir"
    assert len(tags["data.manifest_sha256"]) == 64


def test_register_promote_and_load_back(config, tmp_path):
    backbone, bundle = _bundle(tmp_path, 0)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"num_classes": 5}')
    run_id = tracking.start_run(config, "backbone", shards, "train_backbone", "first")
    tracking.log_metrics(config.tracking, run_id, {"accuracy": 0.8}, step=1)
    first = tracking.log_and_register(config.tracking, run_id, "backbone", bundle, {"accuracy": 0.8})
    tracking.end_run(config.tracking, run_id)
    assert first["champion"]

    mlc = tracking.client(config.tracking)
    run = mlc.get_run(run_id)
    assert run.data.params["train_backbone.backbone.name"] == config.train_backbone.backbone.name
    assert run.data.tags["stage"] == "backbone"
    assert "data.manifest_sha256" in run.data.tags
    version = mlc.get_model_version("facepipe-backbone", first["version"])
    assert version.tags["metric.accuracy"] == "0.8"

    # the same embeddings come back through the registry, with the declared signature
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = backbone(x).numpy()
    model = tracking.load_model("models:/facepipe-backbone@champion", config.tracking)
    np.testing.assert_allclose(model.predict(x.numpy()), expected, rtol=1e-5, atol=1e-6)
    assert list(model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 32, 32]
    reqs = (
        tracking.download_model("models:/facepipe-backbone@champion", config.tracking, tmp_path / "dl")
        / "requirements.txt"
    ).read_text()
    assert "torch==" in reqs and "mlflow==" in reqs

    # a worse model is only the challenger; a better one takes the champion alias
    _, worse = _bundle(tmp_path, 1)
    run2 = tracking.start_run(config, "backbone", shards, "train_backbone", "worse")
    second = tracking.log_and_register(config.tracking, run2, "backbone", worse, {"accuracy": 0.7})
    assert not second["champion"]
    assert str(mlc.get_model_version_by_alias("facepipe-backbone", "champion").version) == first["version"]
    assert str(mlc.get_model_version_by_alias("facepipe-backbone", "challenger").version) == second["version"]
    run3 = tracking.start_run(config, "backbone", shards, "train_backbone", "better")
    third = tracking.log_and_register(config.tracking, run3, "backbone", worse, {"accuracy": 0.9})
    assert third["champion"]
    assert str(mlc.get_model_version_by_alias("facepipe-backbone", "champion").version) == third["version"]

    # the stages get the bundle itself from a URI
    local = tracking.resolve_bundle("models:/facepipe-backbone@champion", config.tracking, tmp_path / "b")
    assert (local / "bundle.json").is_file() and (local / "centres.pt").is_file()


def test_missing_model_is_a_clear_error(config):
    from facepipe.errors import FacepipeError

    tracking.experiment_id(config.tracking)
    with pytest.raises(FacepipeError, match="cannot load model"):
        tracking.resolve_bundle("models:/facepipe-backbone@champion", config.tracking)
