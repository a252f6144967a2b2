"""IResNet (InsightFace arcface_torch layout; also AdaFace's IR-*).

Stem conv3x3-BN-PReLU, four stages of improved basic blocks (BN-conv-BN-PReLU-conv(stride)-BN + shortcut),
each stage halving the resolution, then the output block BN2d → Dropout → FC → BN1d (its scale frozen at 1,
as in the reference). At 112×112 the final conv map is 512×7×7 and the embedding 512-d.

``width`` scales every stage's channel count (1.0 = the original 64/128/256/512), which with short
``layers`` gives the small CPU variants. ``stem_stride=2`` makes the stem convolution halve the input:
a CPU model then reads full 112×112 crops for about the cost of 56×56 ones (the stem learns its own
down-sampling, so fine detail such as eyes and brows survives that a plain resize blurs away).
"""

from __future__ import annotations

import torch
from torch import nn

from facepipe.models.backbones.base import TINY_OPTIONS, Backbone, preset

__all__ = ["IBasicBlock", "IResNet", "IRESNET_LAYERS", "iresnet"]

IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
    "iresnet_tiny": (1, 1, 1, 1),
    "iresnet_tiny_s2": (1, 1, 1, 1),  # iresnet_tiny reading 112×112 through a stride-2 stem
}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(Backbone):
    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 14, 3),
        embedding_size: int = 512,
        dropout: float = 0.0,
        width: float = 1.0,
        input_size: tuple[int, int] = (112, 112),
        stem_stride: int = 1,
    ):
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"IResNet needs four stage depths >= 1, got {layers}")
        if stem_stride not in (1, 2):
            raise ValueError(f"IResNet stem_stride must be 1 or 2, got {stem_stride}")
        channels = [max(1, round(c * width)) for c in (64, 64, 128, 256, 512)]
        steps = 4 if stem_stride == 1 else 5  # a stride-2 stem halves the input once more
        super().__init__(embedding_size, input_size, channels[-1], downsampling_steps=steps)

        self.conv1 = _conv3x3(3, channels[0], stem_stride)
        self.bn1 = nn.BatchNorm2d(channels[0], eps=1e-5)
        self.prelu = nn.PReLU(channels[0])
        stages = []
        cin = channels[0]
        for depth, cout in zip(layers, channels[1:], strict=True):
            blocks = [IBasicBlock(cin, cout, stride=2)]
            blocks += [IBasicBlock(cout, cout) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        h, w = self.feature_size
        self.fc = nn.Linear(cin * h * w, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # InsightFace freezes the embedding BN scale

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The final conv map (before the output block): (B, 512·width, H/16, W/16)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def embed(self, fmap: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.bn2(fmap), 1)
        return self.features(self.fc(self.dropout(x)))


def iresnet(name: str, **kw) -> IResNet:
    layers = preset("IResNet", name, IRESNET_LAYERS)
    if name.startswith("iresnet_tiny"):
        kw = {**TINY_OPTIONS, **kw}
    if name == "iresnet_tiny_s2":
        kw.setdefault("stem_stride", 2)
    return IResNet(layers, **kw)
