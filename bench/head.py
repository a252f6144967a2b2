"""Benchmark: uncertainty-head epoch time with the feature cache vs recomputing the frozen backbone.

    python bench/head.py [--shards DIR] [--images 4000] [--method probface] [--backbone NAME] [--input-size N]

Both runs train the same head on the same P×K plan with the same step code (`head_loss`); one reads
(embedding, conv map) rows from the cache shards, the other decodes the images and runs the frozen
backbone for every batch. Prints one JSON object: `cache_epoch_s`, `recompute_epoch_s`, `speedup`
(goal >= 5) and the one-off `cache_build_s`. Without --shards it writes synthetic JPEG shards first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def epoch_seconds(
    source, units, method_name: str, map_shape, emb_size: int, centres, pk, batch: int
) -> float:
    import torch

    from facepipe.data.sampling import epoch_plan, unit_labels, windows
    from facepipe.train.head import head_loss
    from facepipe.uncertainty import get_method
    from facepipe.uncertainty.head_io import build_head_model

    torch.manual_seed(0)
    method = get_method(method_name)
    model = build_head_model(method_name, map_shape, emb_size, {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    labels = unit_labels(units)
    plan = epoch_plan(labels, windows(units, 8192), 0, 0, 0, 1, pk, batch)
    t0 = time.perf_counter()
    for pairs in plan:
        loss, _ = head_loss(model, method, *source.batch(pairs), centres)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=None, help="a decoded dataset (decode's OUT)")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--method", default="probface", choices=["pfe", "probface", "scf"])
    from facepipe.config import BackboneConfig

    default = BackboneConfig()  # the configured CPU backbone and its input size
    parser.add_argument("--backbone", default=default.name)
    parser.add_argument("--input-size", type=int, default=default.input_size[0])
    args = parser.parse_args()

    import torch

    from bench.loader import write_shards
    from facepipe.data.loader import shard_units
    from facepipe.data.sampling import unit_labels
    from facepipe.models.bundle import BundleInfo, save_bundle
    from facepipe.models.registry import build_backbone
    from facepipe.train.feature_source import CachedFeatures, RecomputedFeatures
    from facepipe.train.features import cache_features, cache_info, cached_shards

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.shards:
            from facepipe.data.dataset import Dataset

            paths = Dataset.open(args.shards).training_shards
        else:
            paths = write_shards(tmp / "shards", args.images)
        size = (args.input_size, args.input_size)
        kwargs = {"embedding_size": 128, "input_size": list(size)}
        backbone = build_backbone(args.backbone, **kwargs).eval()
        num_classes = int(max(labels.max() for labels in unit_labels(shard_units(paths)))) + 1
        centres = torch.randn(num_classes, 128)
        info = BundleInfo(args.backbone, kwargs, 128, size, "RGB", num_classes)
        save_bundle(tmp / "bundle", backbone, info, centres)

        t0 = time.perf_counter()
        cache_dir = cache_features(backbone, paths, tmp / "cache", size, "RGB", "bench")
        build = time.perf_counter() - t0
        meta = cache_info(cache_dir)
        map_shape = tuple(meta["map_shape"])
        pk = (32, 4) if args.method != "scf" else None
        cache_units = shard_units(cached_shards(cache_dir))
        image_units = shard_units(paths)
        cached = CachedFeatures(cache_units, map_shape)
        recomputed = RecomputedFeatures(image_units, backbone, size, "RGB")
        weights = centres if args.method == "scf" else None
        cache_s = epoch_seconds(cached, cache_units, args.method, map_shape, 128, weights, pk, 128)
        recompute_s = epoch_seconds(recomputed, image_units, args.method, map_shape, 128, weights, pk, 128)
        rows = sum(u.rows for u in image_units)
    print(
        json.dumps(
            {
                "method": args.method,
                "backbone": args.backbone,
                "input_size": args.input_size,
                "images": rows,
                "cache_build_s": round(build, 2),
                "cache_epoch_s": round(cache_s, 3),
                "recompute_epoch_s": round(recompute_s, 3),
                "speedup": round(recompute_s / cache_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
