"""SFNet, the SphereFace residual networks (SphereFace-20/36/64; ProbFace's "ResFace64").

Four stages; each opens with a stride-2 3×3 conv + PReLU and continues with residual units
``x + PReLU(conv(PReLU(conv(x))))``; convs carry a bias and there is no BatchNorm in the original
(``batch_norm=True`` adds one after every conv, as some TF ports do). Units per stage: 20 → (1, 2, 4, 1),
36 → (2, 4, 8, 2), 64 → (3, 8, 16, 3). Widths 64/128/256/512, an FC to the 512-d embedding.
Inputs 112×96 (SphereFace) or 96×96 (ProbFace): final conv maps 512×7×6 and 512×6×6.
"""

from __future__ import annotations

import torch
from torch import nn

from facepipe.models.backbones.base import TINY_OPTIONS, Backbone, preset

__all__ = ["SFNet", "SPHERE_UNITS", "sfnet"]

SPHERE_UNITS: dict[str, tuple[int, int, int, int]] = {
    "sphereface20": (1, 2, 4, 1),
    "sphereface36": (2, 4, 8, 2),
    "sphereface64": (3, 8, 16, 3),
    "sphereface_tiny": (1, 1, 1, 1),
}


def _conv(cin: int, cout: int, stride: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride, 1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.PReLU(cout))
    return layers


class SphereUnit(nn.Module):
    def __init__(self, channels: int, batch_norm: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            *_conv(channels, channels, 1, batch_norm), *_conv(channels, channels, 1, batch_norm)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SFNet(Backbone):
    def __init__(
        self,
        units: tuple[int, ...] = (1, 2, 4, 1),
        embedding_size: int = 512,
        input_size: tuple[int, int] = (112, 96),
        width: float = 1.0,
        batch_norm: bool = False,
    ):
        if len(units) != 4 or min(units) < 0:
            raise ValueError(f"SFNet needs four unit counts >= 0, got {units}")
        channels = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        super().__init__(embedding_size, input_size, channels[-1])
        stages = []
        cin = 3
        for n_units, cout in zip(units, channels, strict=True):
            stages.append(
                nn.Sequential(
                    *_conv(cin, cout, 2, batch_norm), *[SphereUnit(cout, batch_norm) for _ in range(n_units)]
                )
            )
            cin = cout
        self.stages = nn.Sequential(*stages)
        h, w = self.feature_size
        self.fc = nn.Linear(cin * h * w, embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        # Caffe prototxt: xavier for the stride-2 convs and the FC, gaussian(0.01) inside residual
        # units, zero biases.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for unit in self.modules():
            if isinstance(unit, SphereUnit):
                for conv in unit.modules():
                    if isinstance(conv, nn.Conv2d):
                        nn.init.normal_(conv.weight, 0.0, 0.01)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def embed(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(fmap, 1))


def sfnet(name: str, **kw) -> SFNet:
    units = preset("SphereFace net", name, SPHERE_UNITS)
    if name == "sphereface_tiny":
        kw = {**TINY_OPTIONS, **kw}
    return SFNet(units, **kw)
