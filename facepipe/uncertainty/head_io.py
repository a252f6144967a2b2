"""A trained uncertainty head on disk: `head.pt` (weights) + `head.json` (method, map shape, sizes).

`build_head_model` wraps a method's head as an `UncertaintyModel` (feature map → log u, and `.uncertainty`
→ u), `save_head` / `load_head` write and read it. It sits beside the methods (not in `train/`) because
tracking, evaluation and export load heads too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from facepipe.errors import FacepipeError
from facepipe.fsutil import torch_save_atomic, write_json_atomic
from facepipe.uncertainty.registry import UncertaintyMethod, build_uncertainty_head, get_method, resolve

HEAD_FILE = "head.pt"
HEAD_META = "head.json"


class UncertaintyModel(nn.Module):
    """head(backbone feature map) -> log u; `uncertainty` gives u (σ² or κ, see the method)."""

    def __init__(self, method: str | UncertaintyMethod, head: nn.Module) -> None:
        super().__init__()
        self.method = resolve(method).name
        self.head = head

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.head(feature_map)

    def uncertainty(self, embedding: Tensor | None, feature_map: Tensor) -> Tensor:
        return get_method(self.method).to_uncertainty(self.head(feature_map))


def build_head_model(
    method: str | UncertaintyMethod, map_shape: tuple[int, ...], embedding_size: int, extra: dict[str, Any]
) -> UncertaintyModel:
    """The method's head (by name, or its registry entry) for a backbone whose conv map is (C, H, W)."""
    c, h, w = map_shape
    head = build_uncertainty_head(method, c, embedding_size, feature_hw=(h, w), **extra)
    return UncertaintyModel(method, head)


def save_head(directory: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write the head's weights and `meta` (method, map_shape, embedding_size, extra), metadata last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    module = getattr(model, "module", model)  # unwrap DDP
    torch_save_atomic({k: v.detach().cpu() for k, v in module.state_dict().items()}, directory / HEAD_FILE)
    write_json_atomic(directory / HEAD_META, meta)
    return directory


def find_heads(root: str | os.PathLike) -> list[Path]:
    """Every head directory at or below `root`, oldest first (a training run keeps one per checkpoint)."""
    root = Path(root)
    if (root / HEAD_META).is_file():
        return [root]
    return sorted((p.parent for p in root.rglob(HEAD_META)), key=lambda d: (d / HEAD_META).stat().st_mtime)


def head_uncertainty_size(directory: str | os.PathLike) -> int:
    """Columns of the uncertainty output by the (newest) head at or below `directory`."""
    found = find_heads(directory)
    if not found:
        raise FacepipeError(f"no uncertainty head ({HEAD_META}) under {directory}")
    meta = json.loads((found[-1] / HEAD_META).read_text())
    return get_method(meta["method"]).uncertainty_size(int(meta["embedding_size"]))


def load_head(directory: str | os.PathLike, info: Any = None) -> UncertaintyModel:
    """An `UncertaintyModel` in eval mode from a directory written by `save_head` (or one above it)."""
    directory = Path(directory)
    if not (directory / HEAD_META).is_file():
        found = sorted(p.parent for p in directory.rglob(HEAD_META))
        if not found:
            raise FacepipeError(f"no uncertainty head ({HEAD_META}) under {directory}")
        directory = found[0]
    meta = json.loads((directory / HEAD_META).read_text())
    model = build_head_model(meta["method"], tuple(meta["map_shape"]), meta["embedding_size"], meta["extra"])
    model.load_state_dict(torch.load(directory / HEAD_FILE, map_location="cpu", weights_only=True))
    return model.eval()
