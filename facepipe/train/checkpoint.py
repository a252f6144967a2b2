"""Checkpoints and model bundles.

Two on-disk formats, both plain directories so they work on any Ray `storage_path` and as MLflow
artifacts:

* a **training state** (`state.pt` + `meta.json`): everything needed to resume exactly, i.e. model,
  margin head, optimiser, LR schedule, AMP scaler, the global step and epoch;
* a **backbone bundle** (`bundle.json` + `backbone.pt` + `centres.pt`): what the next stages need
  to rebuild the trained backbone without its training code: registry name and keyword arguments,
  input size, colour order, and the margin head's class centres (SCF's frozen `w_c`).

Every file is written atomically (temp + rename), and `meta.json` / `bundle.json` last, so a
directory whose metadata exists is complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from facepipe.errors import FacepipeError
from facepipe.fsutil import atomic_path, write_json_atomic

STATE_FILE = "state.pt"
META_FILE = "meta.json"
BUNDLE_FILE = "bundle.json"
BACKBONE_FILE = "backbone.pt"
CENTRES_FILE = "centres.pt"


def _torch_save(obj: Any, path: Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_training_state(directory: str | os.PathLike, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `state` (tensors, state dicts) and `meta` (JSON: step, epoch, ...) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _torch_save(state, directory / STATE_FILE)
    write_json_atomic(directory / META_FILE, meta)
    return directory


def load_training_state(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) from a directory written by `save_training_state`."""
    import torch

    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FacepipeError(f"{directory} is not a complete training checkpoint (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    return state, meta


@dataclass
class BundleInfo:
    """What is needed to rebuild a trained backbone and feed it correctly."""

    backbone: str
    backbone_kwargs: dict[str, Any]
    embedding_size: int
    input_size: tuple[int, int]
    color_order: str
    num_classes: int
    margin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # metrics, data version, ...

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BundleInfo:
        data = dict(data)
        data["input_size"] = tuple(data["input_size"])
        return cls(**data)


def save_bundle(
    directory: str | os.PathLike, backbone: Any, info: BundleInfo, centres: Any | None = None
) -> Path:
    """Write a backbone bundle; `centres` (C, D) are the margin head's class centres (may be None)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    module = getattr(backbone, "module", backbone)  # unwrap DDP
    _torch_save({k: v.detach().cpu() for k, v in module.state_dict().items()}, directory / BACKBONE_FILE)
    if centres is not None:
        _torch_save(centres.detach().cpu().float(), directory / CENTRES_FILE)
    write_json_atomic(directory / BUNDLE_FILE, asdict(info))
    return directory


def is_bundle(directory: str | os.PathLike) -> bool:
    return (Path(directory) / BUNDLE_FILE).is_file()


def find_bundle(root: str | os.PathLike) -> Path:
    """The bundle directory at `root` or below it (MLflow artifacts nest it one or two levels down)."""
    root = Path(root)
    if is_bundle(root):
        return root
    found = sorted(p.parent for p in root.rglob(BUNDLE_FILE))
    if not found:
        raise FacepipeError(f"no backbone bundle ({BUNDLE_FILE}) under {root}")
    return found[0]


def load_bundle(directory: str | os.PathLike, device: str = "cpu") -> tuple[Any, BundleInfo, Any | None]:
    """(backbone in eval mode, info, class centres or None) from a bundle directory."""
    import torch

    from facepipe.models.registry import build_backbone

    directory = find_bundle(directory)
    info = BundleInfo.from_json(json.loads((directory / BUNDLE_FILE).read_text()))
    backbone = build_backbone(info.backbone, **info.backbone_kwargs)
    state = torch.load(directory / BACKBONE_FILE, map_location=device, weights_only=True)
    backbone.load_state_dict(state)
    backbone.to(device).eval()
    centres_path = directory / CENTRES_FILE
    centres = (
        torch.load(centres_path, map_location=device, weights_only=True) if centres_path.is_file() else None
    )
    return backbone, info, centres
