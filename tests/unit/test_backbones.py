"""Backbones: parameter counts equal the original definitions, shapes, feature maps, tiny CPU variants.

Expected counts (all parameters, including InsightFace's frozen BN1d scale, fp16 off):

======================  ===========  =====================================================
iresnet18               24,025,600   InsightFace arcface_torch iresnet18 (2,2,2,2)
iresnet34               34,139,328   (3,4,6,3)
iresnet50               43,590,848   (3,4,14,3): "43.6M"
iresnet100              65,156,160   (3,13,30,3): "65.2M"
iresnet200             118,833,920   (6,26,60,6)
sphereface20            22,670,656   SFNet-20 at 112x96 (1,2,4,1 units), FC 512*7*6 -> 512
sphereface36            32,778,816   (2,4,8,2)
sphereface64            48,200,512   (3,8,16,3)
resface64               46,627,648   SFNet-64 at 96x96 (FC 512*6*6 -> 512), ProbFace
mobilefacenet            2,059,520   arcface_torch "mbf": blocks (1,4,6,2), scale 2
mobilefacenet_large      6,314,880   "mbf_large": blocks (2,8,12,4), scale 4
======================  ===========  =====================================================

Each number is also re-derived below from the layer lists with plain arithmetic (no modules), so a change
to either the modules or the arithmetic is caught.
"""

from __future__ import annotations

import pytest
import torch

from facepipe.errors import FacepipeError
from facepipe.models.registry import BACKBONES, build_backbone

EXPECTED_PARAMS = {
    "iresnet18": 24_025_600,
    "iresnet34": 34_139_328,
    "iresnet50": 43_590_848,
    "iresnet100": 65_156_160,
    "iresnet200": 118_833_920,
    "sphereface20": 22_670_656,
    "sphereface36": 32_778_816,
    "sphereface64": 48_200_512,
    "resface64": 46_627_648,
    "mobilefacenet": 2_059_520,
    "mobilefacenet_large": 6_314_880,
}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- arithmetic from the layer lists


def _iresnet_arith(layers, emb=512, fmap=7 * 7) -> int:
    bn = lambda c: 2 * c
    total = 3 * 64 * 9 + bn(64) + 64  # stem conv, BN, PReLU
    cin = 64
    for depth, cout in zip(layers, (64, 128, 256, 512), strict=True):
        for i in range(depth):
            c_in = cin if i == 0 else cout
            total += bn(c_in) + c_in * cout * 9 + bn(cout) + cout + cout * cout * 9 + bn(cout)
            if i == 0:
                total += c_in * cout + bn(cout)  # 1x1 stride-2 shortcut
        cin = cout
    return total + bn(512) + (512 * fmap * emb + emb) + bn(emb)


def _sfnet_arith(units, fmap) -> int:
    total, cin = 0, 3
    for n, c in zip(units, (64, 128, 256, 512), strict=True):
        total += cin * c * 9 + c + c  # stride-2 conv (bias) + PReLU
        total += n * 2 * (c * c * 9 + c + c)
        cin = c
    return total + 512 * fmap * 512 + 512


def _mbf_arith(blocks, scale, emb=512) -> int:
    def conv_bn(cin, cout, k=1, groups=1, act=True):
        return cin // groups * cout * k * k + 2 * cout + (cout if act else 0)

    def depthwise(cin, cout, g):
        return conv_bn(cin, g) + conv_bn(g, g, 3, g) + conv_bn(g, cout, act=False)

    c1, c2 = 64 * scale, 128 * scale
    total = conv_bn(3, c1, 3)
    total += conv_bn(c1, c1, 3, 64) if blocks[0] == 1 else blocks[0] * depthwise(c1, c1, 128)
    total += depthwise(c1, c1, 128) + blocks[1] * depthwise(c1, c1, 128)
    total += depthwise(c1, c2, 256) + blocks[2] * depthwise(c2, c2, 256)
    total += depthwise(c2, c2, 512) + blocks[3] * depthwise(c2, c2, 256)
    total += conv_bn(c2, 512) + conv_bn(512, 512, 7, 512, act=False) + 512 * emb + 2 * emb
    return total


ARITH = {
    "iresnet18": lambda: _iresnet_arith((2, 2, 2, 2)),
    "iresnet34": lambda: _iresnet_arith((3, 4, 6, 3)),
    "iresnet50": lambda: _iresnet_arith((3, 4, 14, 3)),
    "iresnet100": lambda: _iresnet_arith((3, 13, 30, 3)),
    "iresnet200": lambda: _iresnet_arith((6, 26, 60, 6)),
    "sphereface20": lambda: _sfnet_arith((1, 2, 4, 1), 7 * 6),
    "sphereface36": lambda: _sfnet_arith((2, 4, 8, 2), 7 * 6),
    "sphereface64": lambda: _sfnet_arith((3, 8, 16, 3), 7 * 6),
    "resface64": lambda: _sfnet_arith((3, 8, 16, 3), 6 * 6),
    "mobilefacenet": lambda: _mbf_arith((1, 4, 6, 2), 2),
    "mobilefacenet_large": lambda: _mbf_arith((2, 8, 12, 4), 4),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts_equal_original_definitions(name):
    assert ARITH[name]() == EXPECTED_PARAMS[name]
    with torch.device("meta"):
        model = build_backbone(name)
    assert _count(model) == EXPECTED_PARAMS[name]


def test_iresnet50_is_43_6m_and_100_is_65_2m():
    assert round(EXPECTED_PARAMS["iresnet50"] / 1e6, 1) == 43.6
    assert round(EXPECTED_PARAMS["iresnet100"] / 1e6, 1) == 65.2


def test_iresnet200_builds_on_cpu():
    model = build_backbone("iresnet200")
    assert _count(model) == EXPECTED_PARAMS["iresnet200"]
    assert not model.features.weight.requires_grad  # frozen BN1d scale, as in InsightFace


@pytest.mark.parametrize(
    ("name", "input_size", "fmap_hw"),
    [
        ("iresnet18", (112, 112), (7, 7)),
        ("iresnet100", (112, 112), (7, 7)),
        ("sphereface20", (112, 96), (7, 6)),
        ("sphereface64", (112, 96), (7, 6)),
        ("resface64", (96, 96), (6, 6)),
        ("mobilefacenet", (112, 112), (7, 7)),
    ],
)
def test_forward_features_shapes(name, input_size, fmap_hw):
    """Shapes on the meta device (no compute), so even the 64-layer nets check in milliseconds."""
    with torch.device("meta"):
        model = build_backbone(name).eval()
        x = torch.empty(2, 3, *input_size)
        emb, fmap = model.forward_features(x)
        plain = model(x)
    assert model.input_size == input_size
    assert emb.shape == plain.shape == (2, model.embedding_size) == (2, 512)
    assert fmap.shape == (2, model.feature_channels, *fmap_hw) == (2, 512, *fmap_hw)
    assert model.feature_size == fmap_hw


@pytest.mark.parametrize(
    ("name", "input_size"), [("sphereface20", (112, 96)), ("mobilefacenet_tiny", (112, 112))]
)
def test_real_forward_features_equals_forward(name, input_size):
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    x = torch.randn(1, 3, *input_size)
    with torch.no_grad():
        emb, fmap = model.forward_features(x)
        plain = model(x)
    torch.testing.assert_close(emb, plain)
    assert torch.isfinite(emb).all() and torch.isfinite(fmap).all()


def test_iresnet_final_map_is_512x7x7_and_frozen_backbone_feeds_a_head():
    """An uncertainty head can sit on a frozen backbone: forward_features does not change the model."""
    torch.manual_seed(0)
    model = build_backbone("iresnet18").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(512 * 7 * 7, 1))
    x = torch.randn(2, 3, 112, 112)
    _, fmap = model.forward_features(x)
    assert fmap.shape == (2, 512, 7, 7)
    head(fmap).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert head[1].weight.grad is not None


@pytest.mark.parametrize("name", ["iresnet_tiny", "mobilefacenet_tiny", "sphereface_tiny"])
@pytest.mark.parametrize("size", [56, 112])
def test_tiny_variants_any_input_size(name, size):
    torch.manual_seed(0)
    model = build_backbone(name, input_size=(size, size)).eval()
    assert _count(model) < 1_500_000
    with torch.no_grad():
        emb, fmap = model.forward_features(torch.randn(3, 3, size, size))
    assert emb.shape == (3, model.embedding_size)
    assert fmap.shape[:2] == (3, model.feature_channels)
    assert fmap.shape[2:] == model.feature_size


def test_tiny_width_and_embedding_are_configurable():
    model = build_backbone("iresnet_tiny", width=0.5, embedding_size=64, input_size=(56, 56))
    assert model.feature_channels == 256 and model.embedding_size == 64
    assert model.feature_size == (4, 4)


def test_iresnet_stem_stride_2_reads_112_at_the_cost_of_56():
    """A stride-2 stem on 112×112 input gives the same map, parameter count and FC as stride 1 at 56."""
    plain = build_backbone("iresnet_tiny", input_size=(56, 56))
    strided = build_backbone("iresnet_tiny", input_size=(112, 112), stem_stride=2)
    assert strided.feature_size == plain.feature_size == (4, 4)
    assert _count(strided) == _count(plain)
    with torch.no_grad():
        emb, fmap = strided.eval().forward_features(torch.randn(2, 3, 112, 112))
    assert emb.shape == (2, 128) and fmap.shape[2:] == (4, 4)
    with pytest.raises(ValueError, match="stem_stride"):
        build_backbone("iresnet_tiny", stem_stride=3)


def test_tiny_iresnet_learns_on_cpu():
    """A few SGD steps on a 4-class toy problem reduce the loss (the real CPU run is the sample dataset)."""
    from facepipe.models.registry import build_margin_head

    torch.manual_seed(0)
    model = build_backbone("iresnet_tiny", input_size=(32, 32)).train()
    head = build_margin_head("cosface", embedding_size=model.embedding_size, num_classes=4, s=16.0, m=0.2)
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8) % 4
    x = x + y.view(-1, 1, 1, 1).float()  # separable classes
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = head.loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_registry_lists_and_rejects_unknown_names():
    for name in (
        "iresnet18",
        "iresnet34",
        "iresnet50",
        "iresnet100",
        "iresnet200",
        "sphereface20",
        "sphereface36",
        "sphereface64",
        "mobilefacenet",
        "iresnet_tiny",
        "mobilefacenet_tiny",
    ):
        assert name in BACKBONES
    with pytest.raises(FacepipeError, match="unknown backbone 'resnet9000'"):
        build_backbone("resnet9000")
