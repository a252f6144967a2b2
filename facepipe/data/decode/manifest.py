"""Assemble `OUT/manifest.json` (and `OUT/rejects.parquet`) from the finished ranges of a decode run."""

from __future__ import annotations

import os
from pathlib import Path

from facepipe.data.dataset import REJECTS_NAME, Dataset
from facepipe.data.formats.insightface import TrainingSet

__all__ = ["build_manifest", "source_files", "write_rejects"]


def source_files(sets: list[TrainingSet], source_entries: list[dict]) -> list[Path]:
    """The training-set inputs whose sizes and hashes go into the manifest (pair inputs come apart)."""
    files = [f for ts in sets for f in (ts.rec_path, ts.idx_path, ts.property_path) if f is not None]
    files += [
        ts.rec_path.parent / e["degradation_sidecar"]
        for ts, e in zip(sets, source_entries, strict=True)
        if e["degradation_sidecar"]
    ]
    return files


def _complete_sources(
    source_entries: list[dict], sets: list[TrainingSet], results: list[dict], hashes: dict[str, dict]
) -> None:
    """Fill each source's counts, class count (flat sets: max label + 1) and input file hashes."""
    for entry, ts in zip(source_entries, sets, strict=True):
        mine = [r for r in results if r["dataset"] == entry["dataset"]]
        entry["num_images"] = sum(r["rows"] for r in mine)
        entry["rejected"] = sum(len(r["rejects"]) for r in mine)
        if entry["num_classes"] is None:  # flat set, no property: classes = max label + 1
            highs = [r["label_max"] for r in mine if r["label_max"] is not None]
            entry["num_classes"] = (max(highs) + 1 - entry["label_offset"]) if highs else 0
        folder = ts.rec_path.parent
        entry["files"] = {
            os.path.relpath(f, folder): digest for f, digest in hashes.items() if Path(f).parent == folder
        }


def build_manifest(
    *, results: list[dict], source_entries: list[dict], sets: list[TrainingSet], pairs: dict[str, dict],
    hashes: dict[str, dict], rejects_count: int, rejects_written: bool, image_size: tuple[int, int] | None,
    color_order: str, settings: dict,
) -> dict:  # fmt: skip
    """The manifest: counts, classes, image size, colour order, shards with sha256, sources, pairs."""
    from facepipe.data.shards import TRAIN_SCHEMA

    _complete_sources(source_entries, sets, results, hashes)
    return {
        "format": "facepipe-shards",
        "version": 1,
        "num_images": sum(r["rows"] for r in results),
        "num_classes": sum(e["num_classes"] for e in source_entries),
        "image_size": list(image_size) if image_size else None,
        "color_order": color_order,
        "image_encoding": "as stored in the source (not re-encoded)",
        "columns": TRAIN_SCHEMA.names,
        "shards": [r["shard"] for r in results],
        "pairs": pairs,
        "sources": source_entries,
        "rejects": {"count": rejects_count, "path": REJECTS_NAME if rejects_written else None},
        "settings": settings,
    }


def write_rejects(out: Path, rejects: list[dict], keep_file: bool) -> bool:
    """Write OUT/rejects.parquet when asked (--skip-bad) or when there are rejects; else remove the one
    an earlier --skip-bad run left. Returns whether the file is there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from facepipe.data.shards import DECODE_REJECT_SCHEMA
    from facepipe.fsutil import atomic_path

    path = Path(Dataset(out).rejects_path)
    if not (keep_file or rejects):
        path.unlink(missing_ok=True)
        return False
    schema = DECODE_REJECT_SCHEMA
    table = pa.Table.from_pylist(rejects, schema=schema) if rejects else schema.empty_table()
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return True
