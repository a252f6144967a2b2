"""Training state: what a stage needs to resume exactly (`state.pt` + `meta.json`).

The state holds model, margin head, optimiser, LR schedule, AMP scaler; the metadata the global step
and epoch. The directory is plain, so it works on any Ray `storage_path`. Every file is written
atomically and `meta.json` last, so a directory whose metadata exists is complete.

The saved *model* (the backbone bundle the later stages read) is `facepipe.models.bundle`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from facepipe.errors import FacepipeError
from facepipe.fsutil import torch_save_atomic, write_json_atomic

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def save_training_state(directory: str | os.PathLike, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `state` (tensors, state dicts) and `meta` (JSON: step, epoch, ...) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch_save_atomic(state, directory / STATE_FILE)
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
