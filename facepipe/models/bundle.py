"""The saved backbone: a *bundle* directory (`bundle.json` + `backbone.pt` + `centres.pt`).

A bundle is what the next stages, tracking, evaluation and export need to rebuild a trained backbone
without its training code: registry name and keyword arguments, input size, colour order, and the
margin head's class centres (SCF's frozen `w_c`). It is a plain directory, so it works on any Ray
`storage_path` and as MLflow artifacts. Every file is written atomically and `bundle.json` last, so a
directory whose `bundle.json` exists is complete.

It lives in `models/` (not `train/`) because tracking, eval and export read it: the format sits below
everything that uses it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from facepipe.errors import FacepipeError
from facepipe.fsutil import torch_save_atomic, write_json_atomic

BUNDLE_FILE = "bundle.json"
BACKBONE_FILE = "backbone.pt"
CENTRES_FILE = "centres.pt"


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
    weights = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch_save_atomic(weights, directory / BACKBONE_FILE)
    if centres is not None:
        torch_save_atomic(centres.detach().cpu().float(), directory / CENTRES_FILE)
    write_json_atomic(directory / BUNDLE_FILE, asdict(info))
    return directory


def is_bundle(directory: str | os.PathLike) -> bool:
    return (Path(directory) / BUNDLE_FILE).is_file()


def find_bundle(root: str | os.PathLike) -> Path:
    """The bundle directory at `root` or below it (MLflow artifacts nest it one or two levels down; in a
    Ray Train run folder, the newest checkpoint's: their `checkpoint_<date>_<time>` names sort by time)."""
    root = Path(root)
    if is_bundle(root):
        return root
    found = sorted(p.parent for p in root.rglob(BUNDLE_FILE))
    if not found:
        raise FacepipeError(f"no backbone bundle ({BUNDLE_FILE}) under {root}")
    return found[-1]


def read_bundle_info(directory: str | os.PathLike) -> BundleInfo:
    """The metadata of the bundle at or below `directory`, without loading any weights."""
    return BundleInfo.from_json(json.loads((find_bundle(directory) / BUNDLE_FILE).read_text()))


def load_bundle(directory: str | os.PathLike, device: str = "cpu") -> tuple[Any, BundleInfo, Any | None]:
    """(backbone in eval mode, info, class centres or None) from a bundle directory."""
    import torch

    # lazy: the registry imports every backbone (torch); reading metadata must stay cheap
    from facepipe.models.registry import build_backbone

    directory = find_bundle(directory)
    info = read_bundle_info(directory)
    backbone = build_backbone(info.backbone, **info.backbone_kwargs)
    state = torch.load(directory / BACKBONE_FILE, map_location=device, weights_only=True)
    backbone.load_state_dict(state)
    backbone.to(device).eval()
    centres_path = directory / CENTRES_FILE
    centres = (
        torch.load(centres_path, map_location=device, weights_only=True) if centres_path.is_file() else None
    )
    return backbone, info, centres
