"""MobileFaceNet (InsightFace arcface_torch ``mbf`` layout).

Stem conv3x3/2, a grouped 3×3 conv (or residual bottlenecks), inverted-bottleneck "DepthWise" blocks
(1×1 expand → depthwise 3×3 → linear 1×1) with three stride-2 stages and residual stacks between them,
a 1×1 conv to 512 channels (the final feature map, 512×7×7 at 112×112), then GDC: a global depthwise
conv over the whole map → linear (no bias) → BN1d.
``scale`` multiplies the trunk widths (2 = the default "mbf", 4 with blocks (2, 8, 12, 4) = "mbf_large");
``group_width`` multiplies the expansion widths (used by the tiny CPU variant).
"""

from __future__ import annotations

import torch
from torch import nn

from facepipe.models.backbones.base import Backbone, preset

__all__ = ["MobileFaceNet", "mobilefacenet"]


def _conv_bn(cin, cout, kernel=1, stride=1, padding=0, groups=1, act=True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class DepthWise(nn.Module):
    """1×1 expand to ``groups`` channels → depthwise 3×3 (stride) → linear 1×1 projection."""

    def __init__(self, cin: int, cout: int, groups: int, stride: int = 2, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            _conv_bn(cin, groups),
            _conv_bn(groups, groups, 3, stride, 1, groups=groups),
            _conv_bn(groups, cout, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


def _residual(channels: int, n: int, groups: int) -> nn.Sequential:
    return nn.Sequential(*[DepthWise(channels, channels, groups, stride=1, residual=True) for _ in range(n)])


class MobileFaceNet(Backbone):
    def __init__(
        self,
        blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
        scale: int = 2,
        embedding_size: int = 512,
        input_size: tuple[int, int] = (112, 112),
        feature_channels: int = 512,
        group_width: float = 1.0,
    ):
        super().__init__(embedding_size, input_size, feature_channels)
        g = [max(1, round(c * group_width)) for c in (64, 128, 256, 512)]
        c1, c2 = 64 * scale, 128 * scale
        layers: list[nn.Module] = [_conv_bn(3, c1, 3, 2, 1)]
        if blocks[0] == 1:
            layers.append(_conv_bn(c1, c1, 3, 1, 1, groups=g[0]))
        else:
            layers.append(_residual(c1, blocks[0], g[1]))
        layers += [
            DepthWise(c1, c1, g[1]),
            _residual(c1, blocks[1], g[1]),
            DepthWise(c1, c2, g[2]),
            _residual(c2, blocks[2], g[2]),
            DepthWise(c2, c2, g[3]),
            _residual(c2, blocks[3], g[2]),
        ]
        self.layers = nn.Sequential(*layers)
        self.conv_sep = _conv_bn(c2, self.feature_channels)
        h, w = self.feature_size
        self.gdc = _conv_bn(
            self.feature_channels, self.feature_channels, (h, w), groups=self.feature_channels, act=False
        )
        self.linear = nn.Linear(self.feature_channels, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_sep(self.layers(x))

    def embed(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.features(self.linear(torch.flatten(self.gdc(fmap), 1)))


def mobilefacenet(name: str = "mobilefacenet", **kw) -> MobileFaceNet:
    presets = {
        "mobilefacenet": {},
        "mobilefacenet_large": {"blocks": (2, 8, 12, 4), "scale": 4},
        "mobilefacenet_tiny": {
            "blocks": (1, 1, 1, 1),
            "scale": 1,
            "group_width": 0.5,
            "feature_channels": 128,
            "embedding_size": 128,
        },
    }
    return MobileFaceNet(**{**preset("MobileFaceNet", name, presets), **kw})
