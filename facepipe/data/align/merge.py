"""The finishing step of the align job: merge the chunk files into OUT.

Chunk files are streamed in chunk order (never all in memory), so the output does not depend on which
worker finished first: OUT/train/part-*.parquet (training shards), OUT/rejects.parquet, OUT/labels.json,
optional pair tables and contact sheet, and last OUT/manifest.json, whose presence marks the job complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from facepipe.data.align.contact_sheet import write_contact_sheet
from facepipe.data.align.geometry import Template, get_template
from facepipe.data.align.pairs import write_pairs
from facepipe.data.align.plan import AlignSettings, ChunkTask, read_json
from facepipe.data.align.worker import REJECT_REASONS, chunk_paths, rejects_schema
from facepipe.data.dataset import LABELS_NAME, REJECTS_NAME, SHARD_PREFIX, Dataset
from facepipe.fsutil import escape_name

__all__ = ["merge_chunks"]


def merge_chunks(
    out: Path,
    work: Path,
    plan: dict,
    digest: str,
    settings: AlignSettings,
    tasks: Sequence[ChunkTask],
    target_bytes: int,
    contact_sheet: bool,
) -> dict:
    """Stream the chunk files, in chunk order, into OUT/train shards, rejects, labels and the manifest.

    Returns the job's counts; removes OUT/_work once the manifest is written.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from facepipe.data.shard_writer import ShardWriter
    from facepipe.data.shards import iter_shard_batches
    from facepipe.fsutil import atomic_path, write_json_atomic

    dataset = Dataset.create(out)
    train_dir = Path(dataset.train_dir)
    for pattern in (f"{SHARD_PREFIX}-*.parquet", f".{SHARD_PREFIX}-*.tmp"):
        for stale in list(train_dir.glob(pattern)):
            stale.unlink()  # left by an interrupted finishing step; the chunks hold everything
    reasons: dict[str, int] = {}
    aligned = rejected = detected = 0
    max_label = -1
    with (
        ShardWriter(train_dir, prefix=SHARD_PREFIX, target_bytes=target_bytes) as writer,
        atomic_path(dataset.rejects_path) as rejects_tmp,
    ):
        with pq.ParquetWriter(rejects_tmp, rejects_schema()) as rejects_writer:
            for task in tasks:
                rows_path, rejects_path, done_path = chunk_paths(work, task.index)
                stats = read_json(done_path)
                for batch in iter_shard_batches([rows_path]):
                    writer.write(batch)
                    if batch.num_rows:
                        max_label = max(max_label, pc.max(batch.column("label")).as_py())
                rejects_writer.write_table(pq.read_table(rejects_path, schema=rejects_schema()))
                aligned += stats["aligned"]
                rejected += stats["rejected"]
                detected += stats["detected"]
                for reason, count in stats["reasons"].items():
                    reasons[reason] = reasons.get(reason, 0) + count
        shards = writer.close()
    if aligned + rejected != plan["num_inputs"]:
        raise RuntimeError(f"{plan['num_inputs']} inputs but {aligned} aligned + {rejected} rejected")

    if plan["kind"] == "folders":
        # strict UTF-8 keys whatever the folder names' bytes (fsutil.escape_name; see the README)
        labels = {escape_name(name): label for label, (name, _count) in enumerate(plan["identities"])}
        num_classes = len(labels)
    else:
        num_classes = max(plan.get("num_classes") or 0, max_label + 1)
        labels = {str(label): label for label in range(num_classes)}
    write_json_atomic(dataset.labels_path, labels)

    template = get_template(settings.template)
    counts = {
        "inputs": plan["num_inputs"],
        "aligned": aligned,
        "rejected": rejected,
        "detected": detected,
        "from_landmarks": aligned - detected,
        "reasons": dict(sorted(reasons.items())),
        "shards": len(shards),
        "classes": num_classes,
    }
    for shard in shards:
        shard["path"] = os.path.relpath(shard["path"], out).replace(os.sep, "/")
    manifest = _manifest(plan, digest, settings, template, shards, counts)
    if plan["pairs"]:
        shard_paths = [out / s["path"] for s in shards]
        manifest["pairs"] = [write_pairs(shard_paths, p["path"], dataset.pairs_dir) for p in plan["pairs"]]
    if contact_sheet and aligned:
        write_contact_sheet([out / s["path"] for s in shards], out / "contact_sheet.png", template=template)
        manifest["contact_sheet"] = "contact_sheet.png"
    dataset.write_manifest(manifest)
    shutil.rmtree(work, ignore_errors=True)  # the manifest now records completion
    return counts


def _manifest(
    plan: dict, digest: str, settings: AlignSettings, template: Template, shards: list[dict], counts: dict
) -> dict:
    """OUT/manifest.json: the decode stage's fields (so training reads it alike) plus the align record."""
    from facepipe.fsutil import sha256_file

    source = {"path": plan["source"], "kind": plan["kind"], "images": plan["num_inputs"]}
    if plan.get("landmarks_file"):
        source["landmarks_file"] = plan["landmarks_file"]
        source["landmarks_sha256"] = plan["landmarks_sha256"]
    return {
        "num_images": counts["aligned"],
        "num_classes": counts["classes"],
        "image_size": list(template.size),
        "color_order": "RGB",  # standard JPEG/PNG: decoders yield RGB, cv2.imdecode BGR
        "shards": shards,
        "sources": [source],
        "labels": LABELS_NAME,
        "rejects": {
            "path": REJECTS_NAME,
            "rows": counts["rejected"],
            "reasons": counts["reasons"],
            "meaning": {reason: REJECT_REASONS.get(reason, "") for reason in counts["reasons"]},
        },
        "align": {
            "template": template.name,
            "template_points": [list(p) for p in template.points],
            "landmarks_in_rows": "aligned-crop pixels: image-left eye, image-right eye, nose, mouth l/r",
            "settings": settings.fingerprint(),
            "detector_model_sha256": sha256_file(settings.detector_model)
            if settings.detector_model
            else None,
            "plan_digest": digest,
            "counts": counts,
        },
    }
