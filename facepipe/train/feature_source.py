"""Where the head stage's batches come from: the frozen-feature cache, or the backbone run per batch.

`prepare_features` builds (or reuses) the cache, keyed by `backbone_fingerprint` (backbone weights +
training data), and reports the backbone's conv-map shape; `CachedFeatures` / `RecomputedFeatures` read
a planned batch of (unit, row) pairs from either source with the same result.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facepipe import storage
from facepipe.config import Config
from facepipe.data.dataset import Dataset
from facepipe.data.loader import decode_rows
from facepipe.fsutil import sha256_file
from facepipe.models.bundle import BACKBONE_FILE, load_bundle
from facepipe.models.embed import embed_images
from facepipe.train.features import cache_features, cache_info, cached_shards, read_cached_rows


class CachedFeatures:
    """Rows of the feature cache by (unit, row), through an LRU of decoded row groups."""

    def __init__(self, units: list[Any], map_shape: tuple[int, ...], cache_groups: int = 8):
        self.units, self.map_shape, self.cache_groups = units, map_shape, cache_groups
        self._cache: collections.OrderedDict[int, dict[str, np.ndarray]] = collections.OrderedDict()

    def _group(self, u: int) -> dict[str, np.ndarray]:
        if u in self._cache:
            self._cache.move_to_end(u)
            return self._cache[u]
        unit = self.units[u]
        value = read_cached_rows(unit.path, unit.row_group, self.map_shape)
        self._cache[u] = value
        while len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return value

    def batch(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(embeddings, feature maps float32, labels) of a batch."""
        emb, fmap, lab = [], [], []
        for u in np.unique(pairs[:, 0]):
            rows = pairs[pairs[:, 0] == u, 1]
            group = self._group(int(u))
            emb.append(group["embedding"][rows])
            fmap.append(group["feature_map"][rows].astype(np.float32))
            lab.append(group["label"][rows])
        return np.concatenate(emb), np.concatenate(fmap), np.concatenate(lab)


class RecomputedFeatures:
    """Rows decoded from the image shards and pushed through the frozen backbone (the no-cache path)."""

    def __init__(self, units: list[Any], backbone: Any, input_size: tuple[int, int], color_order: str):
        self.units, self.backbone = units, backbone
        self.input_size, self.color_order = input_size, color_order

    def batch(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pieces = []
        for u in np.unique(pairs[:, 0]):
            unit = self.units[int(u)]
            pieces.append((unit.path, unit.row_group, pairs[pairs[:, 0] == u, 1]))
        images, labels = decode_rows(pieces, np.zeros(len(pairs), bool), self.input_size, self.color_order)
        emb, _, fmap = embed_images(self.backbone, images, maps=True)
        return emb, fmap, labels


def backbone_fingerprint(bundle_dir: Path, shards_dir: str) -> str:
    """Identity of (backbone weights, training data): the key of the feature cache."""
    digest = hashlib.sha256()
    digest.update(sha256_file(bundle_dir / BACKBONE_FILE).encode())
    dataset = Dataset.at(shards_dir)  # local or at a URI: the data's own fingerprint
    digest.update(dataset.fingerprint.encode() if dataset.has_manifest() else str(shards_dir).encode())
    return digest.hexdigest()


@dataclass
class FeatureSource:
    cache_dir: str | None
    cache_shards: list[str]
    map_shape: tuple[int, ...]
    embedding_size: int


def prepare_features(
    config: Config, bundle_dir: Path, shards: list[str], shards_dir: str, use_cache: bool
) -> FeatureSource:
    """Build (or reuse) the feature cache; always report the backbone's map shape."""
    backbone, info, _ = load_bundle(bundle_dir)
    if not use_cache:
        probe = np.zeros((1, *info.input_size, 3), dtype=np.uint8)
        emb, _, fmap = embed_images(backbone, probe, maps=True)
        return FeatureSource(None, [], tuple(fmap.shape[1:]), int(emb.shape[1]))
    fingerprint = backbone_fingerprint(bundle_dir, shards_dir)
    # absolute (workers run in another cwd), or a URI as it is (a cache on object storage)
    features = config.paths.features
    out = storage.join(
        features if storage.is_remote(features) else Path(features).resolve(), fingerprint[:16]
    )
    cache_features(backbone, shards, out, tuple(info.input_size), info.color_order, fingerprint)
    meta = cache_info(out)
    return FeatureSource(
        str(out), [str(p) for p in cached_shards(out)], tuple(meta["map_shape"]), int(meta["embedding_size"])
    )
