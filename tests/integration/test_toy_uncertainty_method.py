"""A new uncertainty method is one file plus one `register` call: a toy method defined here trains through
the real head stage (Ray Train) and is evaluated by `facepipe evaluate`, without touching any other file.

The toy method: one learnable log σ² shared by every image (a constant-variance head), trained by the
Gaussian NLL of each embedding around its batch mean; pairs are scored by −(1−cos)/(σ²a+σ²b) − log(σ²a+σ²b).
"""

from __future__ import annotations

import json
import shutil
import sys

import cloudpickle
import pytest
import torch
from torch import Tensor, nn

from facepipe.cli import main
from facepipe.config import dump_config
from facepipe.models.bundle import BundleInfo, save_bundle
from facepipe.models.registry import build_backbone
from facepipe.uncertainty import registry
from tests.integration.conftest import small_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "toy"


class ToyHead(nn.Module):
    """log σ² (N, 1), the same learnable value for every image."""

    def __init__(self, in_channels: int, embedding_size: int, init: float = 0.0) -> None:
        super().__init__()
        self.log_var = nn.Parameter(torch.tensor([float(init)]))

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.log_var.expand(feature_map.shape[0], 1)


def build_head(in_channels: int, embedding_size: int, **kw) -> ToyHead:
    return ToyHead(in_channels, embedding_size, **kw)


def to_uncertainty(head_output: Tensor) -> Tensor:
    return torch.exp(head_output)


def loss(mu: Tensor, log_var: Tensor, labels: Tensor, **_: object) -> tuple[Tensor, dict[str, Tensor]]:
    spread = ((mu - mu.mean(dim=0, keepdim=True)) ** 2).sum(dim=1, keepdim=True)
    total = (spread * torch.exp(-log_var) + log_var).mean()
    return total, {"sigma_sq": torch.exp(log_var).mean().detach()}


def pair_score(mu_a: Tensor, var_a: Tensor, mu_b: Tensor, var_b: Tensor) -> Tensor:
    var = (var_a.reshape(-1) + var_b.reshape(-1)).to(mu_a.dtype)
    return -(1.0 - (mu_a * mu_b).sum(dim=1)) / var - torch.log(var)


def score_matrix(mu_a: Tensor, var_a: Tensor, mu_b: Tensor, var_b: Tensor) -> Tensor:
    var = var_a.reshape(-1, 1) + var_b.reshape(1, -1)
    return -(1.0 - mu_a @ mu_b.T) / var - torch.log(var)


def fuse(mu: Tensor, var: Tensor, **_: object) -> tuple[Tensor, Tensor]:
    if mu.ndim != 2 or mu.shape[0] == 0:
        raise ValueError("cannot fuse an empty template")
    mean = mu.mean(dim=0)
    return mean / mean.norm(), var.reshape(-1, 1).mean(dim=0)


def uncertainty_scalar(var: Tensor) -> Tensor:
    return var.reshape(var.shape[0], -1)[:, 0]


@pytest.fixture
def toy_method():
    """The one registration call; the Ray workers receive the functions by value (this file is no package)."""
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    spec = registry.register(
        module, head_input="conv_map", batching="plain", kind="sigma_sq", score_name="toy"
    )
    try:
        yield spec
    finally:
        registry.METHODS.pop(NAME, None)
        cloudpickle.unregister_pickle_by_value(module)


def test_toy_method_trains_and_evaluates(toy_method, ray_cluster, sample_dataset, tmp_path):
    from facepipe.train.head import train_uncertainty

    assert "toy" in registry.method_names() and toy_method.model_name == "facepipe-toy"
    config = small_config(sample_dataset, tmp_path, ray_cluster.address)
    config.train_uncertainty.max_steps = 4
    config.train_uncertainty.batch_size = 16
    torch.manual_seed(0)
    backbone = build_backbone("iresnet_tiny", embedding_size=64, input_size=[32, 32]).eval()
    info = BundleInfo("iresnet_tiny", {"embedding_size": 64, "input_size": [32, 32]}, 64, (32, 32), "RGB", 40)
    bundle = save_bundle(tmp_path / "model" / "bundle", backbone, info)

    result = train_uncertainty(config, method="toy", backbone_uri=str(bundle), run_name="toy", track=False)
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    assert "val/synth_val/risk_acc_reject_30" in result.metrics

    # the trained head beside the bundle, as a registered model's artifacts hold them
    shutil.copytree(result.extra["head_dir"], tmp_path / "model" / "head")
    out = tmp_path / "report"
    params = tmp_path / "params.yaml"  # this run's own parameters, not the working directory's
    params.write_text(dump_config(config))
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--shards", str(sample_dataset / "shards")]
    assert main([*argv, "--config", str(params), "--out", str(out)]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    table = summary["synth_val"]
    assert 0.0 <= table["toy_accuracy"] <= 1.0
    assert json.loads((out / "model.json").read_text())["method"] == "toy"
