"""What every backbone shares: the size attributes facepipe reads, the two forward passes, presets by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import nn

__all__ = ["Backbone", "TINY_OPTIONS", "downsampled_size", "preset"]

# The CPU-sized "_tiny" variants of IResNet and SFNet: a quarter of the width and 128-d embeddings.
TINY_OPTIONS: dict[str, object] = {"width": 0.25, "embedding_size": 128}

_Preset = TypeVar("_Preset")


def downsampled_size(size: int, steps: int = 4) -> int:
    """A side length after ``steps`` stride-2 3×3 convolutions with padding 1."""
    for _ in range(steps):
        size = (size - 1) // 2 + 1
    return size


def preset(kind: str, name: str, presets: Mapping[str, _Preset]) -> _Preset:
    """``presets[name]``; for an unknown name a ValueError that lists the known ones."""
    if name not in presets:
        raise ValueError(f"unknown {kind} {name!r}; known: {sorted(presets)}")
    return presets[name]


class Backbone(nn.Module):
    """A face backbone: ``feature_map`` (images → final conv map), then ``embed`` (map → embedding).

    Subclasses define those two; ``forward`` and ``forward_features`` are built on them here, so every
    backbone returns the same things. The constructor records ``input_size`` (h, w), ``embedding_size``,
    ``feature_channels`` and ``feature_size`` (h, w of the final map after ``downsampling_steps``).
    """

    def __init__(
        self,
        embedding_size: int,
        input_size: tuple[int, int],
        feature_channels: int,
        downsampling_steps: int = 4,
    ) -> None:
        super().__init__()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.embedding_size = int(embedding_size)
        self.feature_channels = int(feature_channels)
        h, w = self.input_size
        self.feature_size = (downsampled_size(h, downsampling_steps), downsampled_size(w, downsampling_steps))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def embed(self, fmap: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding, final conv map)``: the map is what uncertainty heads read."""
        fmap = self.feature_map(x)
        return self.embed(fmap), fmap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.feature_map(x))
