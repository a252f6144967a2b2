"""Export to ONNX and TorchScript reproduces eager outputs (embedding, σ²/κ) to 1e-5."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from facepipe.errors import FacepipeError
from facepipe.models.export import (
    EmbeddingOnly,
    example_images,
    export_backbone,
    export_model,
    export_with_uncertainty,
    read_metadata,
    run_exported,
    verify_export,
)
from facepipe.uncertainty import EmbeddingWithUncertainty, build_uncertainty_head

ATOL = 1e-5


class TinyBackbone(nn.Module):
    """A small conv net with the registry's backbone interface (forward_features → (embedding, conv map))."""

    input_size = (16, 16)
    feature_channels = 8
    feature_size = (4, 4)
    embedding_size = 12

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.PReLU(8),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.PReLU(8),
        )
        self.fc = nn.Linear(8 * 4 * 4, 12)
        self.bn = nn.BatchNorm1d(12)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.body(x)
        return self.bn(self.fc(torch.flatten(fmap, 1))), fmap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


def _randomise_bn(module: nn.Module) -> nn.Module:
    """Give BN layers non-trivial running statistics, so eval-mode export is really exercised."""
    g = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_backbone_export_reproduces_eager(tmp_path, fmt):
    backbone = _randomise_bn(TinyBackbone())
    path = export_backbone(backbone, tmp_path / f"backbone.{'onnx' if fmt == 'onnx' else 'pt'}", fmt=fmt)
    images = example_images(backbone, batch=5, seed=1)  # another batch size than at export: dynamic axis
    err = verify_export(path, EmbeddingOnly(backbone), images, atol=ATOL)
    print(f"tiny backbone {fmt}: max err {err:.3g}")
    assert err <= ATOL
    assert read_metadata(path) == {"input_shape": "N,3,16,16", "embedding_size": "12", "outputs": "embedding"}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


@pytest.mark.parametrize(
    ("method", "fmt"), [("pfe", "onnx"), ("probface", "onnx"), ("scf", "onnx"), ("scf", "torchscript")]
)
def test_backbone_with_uncertainty_head_exports(tmp_path, method, fmt):
    backbone = _randomise_bn(TinyBackbone())
    head = _randomise_bn(build_uncertainty_head(method, 8, 12, feature_hw=(4, 4)))
    suffix = "onnx" if fmt == "onnx" else "pt"
    path = export_with_uncertainty(backbone, head, method, tmp_path / f"{method}.{suffix}", fmt=fmt)
    model = EmbeddingWithUncertainty(backbone, head, method)
    images = example_images(backbone, batch=3, seed=2)
    err = verify_export(path, model, images, atol=ATOL)
    embedding, uncertainty = run_exported(path, images)
    assert embedding.shape == (3, 12)
    assert uncertainty.shape == ((3, 12) if method == "pfe" else (3, 1))
    assert (uncertainty > 0).all()
    meta = read_metadata(path)
    assert meta["uncertainty_method"] == method
    assert meta["outputs"] == ("embedding,kappa" if method == "scf" else "embedding,sigma_sq")
    print(f"tiny backbone + {method} head {fmt}: max err {err:.3g}")


@pytest.mark.slow
def test_registry_backbones_export(tmp_path):
    registry = pytest.importorskip("facepipe.models.registry")
    for name in ("iresnet_tiny", "mobilefacenet_tiny", "sphereface_tiny"):
        if name not in registry.BACKBONES:
            continue
        backbone = _randomise_bn(registry.build_backbone(name))
        head = _randomise_bn(
            build_uncertainty_head(
                "scf", backbone.feature_channels, backbone.embedding_size, feature_hw=backbone.feature_size
            )
        )
        images = example_images(backbone, batch=2, seed=3)
        path = export_backbone(backbone, tmp_path / f"{name}.onnx")
        err_b = verify_export(path, EmbeddingOnly(backbone), images, atol=ATOL)
        path = export_with_uncertainty(backbone, head, "scf", tmp_path / f"{name}_scf.onnx")
        err_u = verify_export(path, EmbeddingWithUncertainty(backbone, head, "scf"), images, atol=ATOL)
        print(f"{name}: backbone onnx err {err_b:.3g}, + scf head err {err_u:.3g}")


def test_verify_export_detects_a_different_model(tmp_path):
    backbone = _randomise_bn(TinyBackbone())
    path = export_backbone(backbone, tmp_path / "b.onnx")
    other = _randomise_bn(TinyBackbone())  # different random weights
    with pytest.raises(FacepipeError, match="differ from eager"):
        verify_export(path, EmbeddingOnly(other), example_images(backbone), atol=ATOL)


def test_bad_format_and_opset_are_user_errors(tmp_path):
    backbone = TinyBackbone().eval()
    with pytest.raises(FacepipeError, match="format"):
        export_model(EmbeddingOnly(backbone), example_images(backbone), tmp_path / "x", fmt="tflite")
    with pytest.raises(FacepipeError, match="opset"):
        export_model(EmbeddingOnly(backbone), example_images(backbone), tmp_path / "x.onnx", opset=11)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_export_command_on_a_saved_bundle_and_head(tmp_path, capsys):
    pytest.importorskip("facepipe.models.registry")
    checkpoint = pytest.importorskip("facepipe.models.bundle")
    stage = pytest.importorskip("facepipe.uncertainty.head_io")
    from facepipe.cli import main
    from facepipe.models.registry import build_backbone

    backbone = _randomise_bn(build_backbone("mobilefacenet_tiny"))
    info = checkpoint.BundleInfo(
        backbone="mobilefacenet_tiny",
        backbone_kwargs={},
        embedding_size=backbone.embedding_size,
        input_size=tuple(backbone.input_size),
        color_order="RGB",
        num_classes=10,
    )
    checkpoint.save_bundle(tmp_path / "model" / "bundle", backbone, info)
    map_shape = (backbone.feature_channels, *backbone.feature_size)
    head_model = stage.build_head_model("probface", map_shape, backbone.embedding_size, {})
    _randomise_bn(head_model)
    stage.save_head(
        tmp_path / "model" / "head",
        head_model,
        {
            "method": "probface",
            "map_shape": list(map_shape),
            "embedding_size": backbone.embedding_size,
            "extra": {},
        },
    )
    out = tmp_path / "exported" / "model.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "model"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "probface" in printed and "max error vs eager" in printed
    meta = read_metadata(out)
    assert meta["backbone"] == "mobilefacenet_tiny" and meta["color_order"] == "RGB"
    assert meta["uncertainty_method"] == "probface"
    images = example_images(backbone, batch=3, seed=5)
    embedding, sigma_sq = run_exported(out, images)
    assert embedding.shape == (3, backbone.embedding_size) and sigma_sq.shape == (3, 1)
    # backbone only, TorchScript
    out_ts = tmp_path / "exported" / "backbone.pt"
    assert (
        main(["export", "--checkpoint", str(tmp_path / "model"), "--out", str(out_ts), "--backbone-only"])
        == 0
    )
    (emb_ts,) = run_exported(out_ts, images)
    assert abs(emb_ts - embedding).max() < 1e-5 * max(1.0, abs(embedding).max())
    # a missing checkpoint is a user error (exit 2), not a traceback
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)]) == 2
