"""A cache of a frozen backbone's outputs on evaluation images, shared by every model built on it.

A benchmark scores several models on one backbone (each uncertainty head sits on the backbone it was
trained on, and the backbone itself is scored too); each of them ran that backbone over the same pair
tables and protocol images, and that forward pass is most of an evaluation's time. With a cache, the
first model stores the backbone's outputs per image table and the others only run their head on them.

An entry is one NPZ per (backbone weights, image table, how it was embedded):

* the key is the sha256 of the backbone's state dict (names, dtypes, shapes and bytes), of the table
  file's bytes, and of input size, colour order, flip and batch size: a retrained backbone, a changed
  table or other settings never hit an old entry, and nothing else can change the outputs;
* it holds ``embeddings``, ``flipped`` (with flip) and ``maps`` (the final conv map, which every
  uncertainty head reads), float32 as the backbone gave them, so a cached evaluation gives the same
  numbers as an uncached one.

The cache is opt-in, since the maps of a large evaluation set of a large backbone take gigabytes: the
configuration key ``eval.embedding_cache`` (``facepipe evaluate --embedding-cache DIR`` sets it; the
benchmark flow passes ``<paths.features>/eval-embeddings``, and the demo sets the key for every stage,
so the training stages' end-of-stage evaluations share it too). It is a local folder: the outputs are
read back by the process that wrote them or its neighbours, never shipped between nodes. Entries are
written atomically; deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.errors import FacepipeError
from facepipe.fsutil import atomic_path, sha256_file
from facepipe.storage import is_remote

log = logging.getLogger(__name__)

FOLDER = "eval-embeddings"  # the cache's folder under paths.features, where the flows keep it
KEYS = ("embeddings", "flipped", "maps")
FORMAT = 1  # bump when an entry's layout changes: old entries are then never read


def state_digest(module: Any) -> str:
    """sha256 of a torch module's state dict: equal exactly when the weights (and buffers) are."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # through uint8: every dtype (bfloat16, bool) has bytes, not every one has a numpy twin
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class EmbeddingCache:
    """Backbone outputs per image table under `root` (see the module docstring)."""

    root: Path

    @classmethod
    def at(cls, location: str | os.PathLike | None) -> EmbeddingCache | None:
        """The cache in the local folder `location`; None when it is not set."""
        if not location:
            return None
        if is_remote(location):
            raise FacepipeError(f"eval.embedding_cache must be a local folder, not {location}")
        return cls(Path(location))

    def entry(self, backbone_digest: str, source: str | os.PathLike, settings: dict[str, Any]) -> Path:
        """Where the outputs of the backbone `backbone_digest` on the table `source` live."""
        key = {"format": FORMAT, "backbone": backbone_digest, "table": sha256_file(source), **settings}
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]
        return self.root / f"{name}.npz"

    def load(self, path: Path) -> dict[str, np.ndarray] | None:
        """The entry's arrays, or None when it is missing or unreadable (then it is computed again)."""
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files if k in KEYS}
        except (OSError, ValueError) as err:  # e.g. a truncated file written by something else
            log.warning("embedding cache entry %s is unreadable (%s); computing it again", path, err)
            return None

    def save(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **{k: v for k, v in arrays.items() if k in KEYS})
