"""The frozen backbone's outputs during training: pair-table verification and the feature cache.

* `verify_pairs`: embeddings of a verification pair table (image and its mirror, through
  `facepipe.models.embed`), scored with the InsightFace 10-fold protocol. Used after every training
  epoch and by the stages' final benchmark.
* `cache_features`: the frozen backbone's outputs for every training image, written as Parquet shards
  with one output row group per input row group (same row order), so the uncertainty stage plans
  batches identically on images or on the cache and heads train without re-running the backbone.
  Each output shard is written atomically and skipped when present: an interrupted run resumes
  without duplicates or gaps.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from facepipe import storage
from facepipe.data.dataset import Dataset
from facepipe.eval import metrics as M
from facepipe.eval.features import PairFeatures
from facepipe.eval.pairs import degradation_metrics
from facepipe.eval.verification import evaluate_embeddings
from facepipe.fsutil import atomic_path, clean_stale_temps, write_json_atomic
from facepipe.models.embed import decode_images_of, embed_images, embed_pair_table
from facepipe.progress import progress

log = logging.getLogger(__name__)

CACHE_META = "features.json"


def verify_pairs(
    # the backbone and how it takes its images (size, colour order)
    backbone: Any, shards_dir: str | os.PathLike, input_size: tuple[int, int], color_order: str,
    folds: int = 10,
    clean_accuracy: bool = False,
    flip: bool = True,
    rank: int = 0,
    world: int = 1,
) -> dict[str, float]:
    """10-fold accuracy (and std) on every pair table of the dataset, plus their mean as `accuracy`.

    With `clean_accuracy`, where a pair table carries its images' degradation (generated data: decode
    copies it from the generator's sidecar), also the degradation bands `facepipe evaluate` reports
    (`facepipe.eval.pairs.degradation_metrics`: clean, degraded, heavily degraded accuracy and counts),
    under the same names.

    `rank`/`world` split the tables between training workers (table i goes to rank i mod world): each
    returns its own tables' metrics, and `accuracy` is the mean over those (`merge_verification` joins
    the parts). `flip=False` embeds each image once instead of also its mirror, half the cost.
    """
    metrics: dict[str, float] = {}
    accs = []
    dataset = Dataset.at(shards_dir)
    for i, (name, path) in enumerate(dataset.pair_tables.items()):
        if i % world != rank:
            continue
        out = embed_pair_table(backbone, path, input_size, color_order, flip=flip)
        result = evaluate_embeddings(out["embedding"], out["issame"], out["flipped"], n_folds=folds)
        metrics[M.table_key(name, M.ACCURACY)] = float(result.accuracy)
        metrics[M.table_key(name, M.STD)] = float(result.std)
        accs.append(float(result.accuracy))
        degradation = dataset.pair_degradation(name) if clean_accuracy else None
        if degradation is not None:  # the evaluation's own bands (clean, degraded, heavily degraded)
            features = PairFeatures(out["embedding"], out["issame"], out["flipped"], degradation=degradation)
            bands = degradation_metrics(features, folds)
            metrics.update({M.table_key(name, k): float(v) for k, v in bands.items()})
    if accs:
        metrics[M.ACCURACY] = float(np.mean(accs))
    return metrics


def merge_verification(parts: list[dict[str, float]]) -> dict[str, float]:
    """Join the per-rank results of `verify_pairs(rank=..., world=...)`: `accuracy` over all tables."""
    merged: dict[str, float] = {}
    for part in parts:
        merged.update({k: v for k, v in part.items() if k != M.ACCURACY})
    accs = [v for k, v in merged.items() if k.startswith("val/") and k.endswith(f"/{M.ACCURACY}")]
    if accs:
        merged[M.ACCURACY] = float(np.mean(accs))
    return merged


# ---------------------------------------------------------------------------------------------
# Feature cache
# ---------------------------------------------------------------------------------------------


def _cache_schema(embedding_size: int, map_size: int) -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("key", pa.int64()),
            pa.field("label", pa.int64()),
            pa.field("embedding", pa.list_(pa.float32(), embedding_size)),
            pa.field("feature_map", pa.list_(pa.float16(), map_size)),
            pa.field("degradation", pa.float32()),
        ]
    )


def cache_features(
    backbone: Any,
    shard_paths: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    input_size: tuple[int, int],
    color_order: str,
    fingerprint: str,
    batch_rows: int = 256,
) -> Path:
    """Write the frozen backbone's (embedding, final conv map) for every row of `shard_paths`.

    Output shard i mirrors input shard i row group by row group. `fingerprint` identifies the backbone
    and data; a cache made with another fingerprint is rebuilt rather than reused.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if storage.is_remote(out_dir):  # object storage: built locally, published with its metadata last
        meta_uri = storage.join(out_dir, CACHE_META)
        if (
            storage.exists(meta_uri)
            and json.loads(storage.read_text(meta_uri)).get("fingerprint") == fingerprint
        ):
            return out_dir
        with storage.local_staging(out_dir) as staging:
            cache_features(backbone, shard_paths, staging, input_size, color_order, fingerprint, batch_rows)
            storage.remove(meta_uri)  # then no stale shard of another fingerprint stays listed
            for uri in storage.list_files(out_dir, ".parquet"):
                if not (staging / uri.rsplit("/", 1)[1]).is_file():
                    storage.remove(uri)
            storage.publish_tree(staging, out_dir, CACHE_META)
        return out_dir
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    meta_path = out / CACHE_META
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("fingerprint") != fingerprint:
        for old in out.glob("*.parquet"):
            old.unlink()
        meta_path.unlink()
    backbone.eval()
    probe = np.zeros((1, *input_size, 3), dtype=np.uint8)
    emb0, _, map0 = embed_images(backbone, probe, maps=True)
    map_shape = tuple(int(v) for v in map0.shape[1:])
    schema = _cache_schema(emb0.shape[1], int(np.prod(map_shape)))
    written = 0
    for index, src in enumerate(
        progress(shard_paths, total=len(shard_paths), desc="cache features", unit="shard")
    ):
        dst = out / f"features-{index:05d}.parquet"
        if dst.is_file():
            continue
        handle = pq.ParquetFile(storage.open_input_file(src) if storage.is_remote(src) else src)
        columns = [c for c in ("key", "label", "image", "degradation") if c in handle.schema_arrow.names]
        with atomic_path(dst) as tmp, pq.ParquetWriter(tmp, schema, compression="none") as writer:
            for rg in range(handle.metadata.num_row_groups):
                table = handle.read_row_group(rg, columns=columns)
                parts = []
                for start in range(0, table.num_rows, batch_rows):
                    chunk = table.slice(start, batch_rows)
                    images = decode_images_of(
                        chunk.column("image").to_pylist(), input_size, color_order, str(src), start
                    )
                    emb, _, fmap = embed_images(backbone, images, maps=True)
                    n = len(emb)
                    deg = (
                        chunk.column("degradation").to_numpy(zero_copy_only=False).astype(np.float32)
                        if "degradation" in columns
                        else np.full(n, np.nan, np.float32)
                    )
                    parts.append(
                        pa.table(
                            {
                                "key": chunk.column("key"),
                                "label": chunk.column("label"),
                                "embedding": pa.FixedSizeListArray.from_arrays(
                                    pa.array(emb.reshape(-1), pa.float32()), emb.shape[1]
                                ),
                                "feature_map": pa.FixedSizeListArray.from_arrays(
                                    pa.array(fmap.reshape(-1).astype(np.float16), pa.float16()),
                                    int(np.prod(map_shape)),
                                ),
                                "degradation": pa.array(deg, pa.float32()),
                            },
                            schema=schema,
                        )
                    )
                writer.write_table(pa.concat_tables(parts), row_group_size=table.num_rows)
        written += 1
    write_json_atomic(
        meta_path,
        {
            "fingerprint": fingerprint,
            "map_shape": list(map_shape),
            "embedding_size": int(emb0.shape[1]),
            "shards": len(shard_paths),
        },
    )
    log.info("feature cache %s: %d shards written, %d reused", out, written, len(shard_paths) - written)
    return out


def cache_info(out_dir: str | os.PathLike) -> dict[str, Any]:
    if storage.is_remote(out_dir):
        return json.loads(storage.read_text(storage.join(out_dir, CACHE_META)))
    return json.loads((Path(out_dir) / CACHE_META).read_text())


def cached_shards(out_dir: str | os.PathLike) -> list[Path] | list[str]:
    if storage.is_remote(out_dir):  # URIs
        return [
            u for u in storage.list_files(out_dir, ".parquet") if u.rsplit("/", 1)[1].startswith("features-")
        ]
    return sorted(p for p in Path(out_dir).glob("features-*.parquet"))


def read_cached_rows(path: str, row_group: int, map_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """One row group of the cache as arrays: label, embedding (N, D), feature_map (N, *map_shape)."""
    import pyarrow.parquet as pq

    source = storage.open_input_file(path) if storage.is_remote(path) else path  # range reads on a store
    table = pq.ParquetFile(source).read_row_group(row_group)
    emb = table.column("embedding").combine_chunks()
    fmap = table.column("feature_map").combine_chunks()
    n = table.num_rows
    return {
        "label": table.column("label").to_numpy(),
        "embedding": emb.values.to_numpy().reshape(n, -1),
        "feature_map": fmap.values.to_numpy(zero_copy_only=False).reshape(n, *map_shape),
        "degradation": table.column("degradation").to_numpy(zero_copy_only=False),
    }
