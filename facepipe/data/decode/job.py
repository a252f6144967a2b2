"""`facepipe decode`: InsightFace `.rec`/`.idx`/`property` + `*.bin` folders → Parquet shards + manifest.

The steps, each in its own module:
- `plan`: cut each source's image records (by `.idx` offset) into shard-sized key ranges;
- `worker.convert_range`: one range → one shard (a top-level function: a process or a Ray task);
- `runner`: run the ranges here, in a local process pool, or through a given runner;
- `resume`: done-markers, so a rerun after a crash skips finished ranges; cached source hashes;
- `pairs`: the verification `.bin` files → pair tables;
- `manifest`: the manifest and the rejects table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from facepipe.data.dataset import MANIFEST_NAME, Dataset
from facepipe.data.decode.hashing import DEFAULT_SOURCE_HASH, check_source_hash
from facepipe.data.decode.manifest import build_manifest, source_files, write_rejects
from facepipe.data.decode.pairs import write_pairs
from facepipe.data.decode.plan import build_plan, dataset_ids, plan_ranges
from facepipe.data.decode.resume import DONE_DIR, SourceHasher, remove_outside_plan
from facepipe.data.decode.runner import Runner, ray_runner, run_tasks
from facepipe.data.decode.worker import convert_range
from facepipe.data.formats.image_header import DEFAULT_MAX_PIXELS
from facepipe.data.formats.insightface import TrainingSet
from facepipe.errors import DataError
from facepipe.fsutil import clean_stale_temps
from facepipe.storage import exists, is_remote, local_staging, publish_tree, remove

__all__ = ["decode_dataset", "plan_ranges", "convert_range", "DONE_DIR", "Runner"]


def decode_dataset(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    target_bytes: int = 256 << 20,
    workers: int = 1,
    validate: bool = False,
    skip_bad: bool = False,
    color_order: str = "RGB",
    row_group_bytes: int | None = None,
    runner: Runner | None = None,
    source_hash: str = DEFAULT_SOURCE_HASH,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    ray_address: str | None = None,
) -> dict:
    """Convert InsightFace dataset folders into Parquet shards, pair tables and a manifest.

    `runner(convert_range, tasks)`, if given, runs the range tasks instead of the local process pool and
    yields their results in any order; on a Ray cluster, for instance::

        remote = ray.remote(convert_range)
        runner = lambda fn, tasks: ray.get([remote.remote(t) for t in tasks])

    Several sources become one training set with disjoint label ranges (source i's labels are offset
    by the class counts of sources 0..i-1). Each source file's size and `source_hash` digest (xxh3_128
    or sha256) go into the manifest; shards always get sha256. With `validate`, an image whose header
    declares more than `max_pixels` is refused before it is decoded. Returns the manifest (also written
    to OUT/manifest.json). `ray_address` (e.g. "ray://head:10001") runs the ranges as Ray tasks there
    (`decode_runner.ray_runner`) unless a `runner` is given.

    OUT may be a URI (`s3://bucket/shards`): the dataset is built in a local staging folder (kept
    after a kill, so a rerun resumes there) and published to OUT with the manifest last, so OUT has
    a manifest only once every shard and pair table is there.
    """
    from facepipe.data.shards import DEFAULT_ROW_GROUP_BYTES

    check_source_hash(source_hash)  # before any work, not in the hashing thread
    if color_order not in ("RGB", "BGR"):
        raise DataError(f"colour order must be RGB or BGR, not {color_order!r}")
    if not sources:
        raise DataError("no source given")
    if target_bytes <= 0:
        raise DataError("target shard size must be positive")
    if is_remote(out_dir):
        options = dict(
            target_bytes=target_bytes, workers=workers, validate=validate, skip_bad=skip_bad,
            color_order=color_order, row_group_bytes=row_group_bytes, runner=runner,
            source_hash=source_hash, max_pixels=max_pixels,
        )  # fmt: skip
        try:  # an unreachable store or a missing bucket fails now, not after the whole conversion
            exists(Dataset.at(out_dir).manifest_path)
        except OSError as err:
            raise DataError(f"cannot reach the output location: {err}", str(out_dir)) from None
        if ray_address is not None and runner is None:
            # the tasks upload their shards themselves: the old manifest goes first
            options["runner"] = ray_runner(ray_address, str(out_dir), sources)
            remove(Dataset.at(out_dir).manifest_path)
        with local_staging(out_dir) as staging:
            manifest = decode_dataset(sources, staging, **options)
            try:
                manifest["_run"]["published"] = publish_tree(staging, out_dir, MANIFEST_NAME)
            except OSError as err:
                raise DataError(f"cannot publish the decoded dataset: {err}", str(out_dir)) from None
        return manifest

    if ray_address is not None and runner is None:
        runner = ray_runner(ray_address, sources=sources, out_dir=out_dir)
    row_group_bytes = int(row_group_bytes or min(DEFAULT_ROW_GROUP_BYTES, target_bytes))
    if not 0 < row_group_bytes < 1 << 31:  # a row group's payloads are addressed with int32 offsets
        raise DataError(f"row-group size must be between 1 byte and 2 GiB, not {row_group_bytes}")
    out = Path(out_dir)
    srcs = [Path(s) for s in sources]
    ids = dataset_ids(srcs)
    dataset = Dataset.create(out)
    for directory in (out, dataset.train_dir, dataset.pairs_dir, out / DONE_DIR):
        directory.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(directory)

    plan = build_plan(srcs, ids, out, target_bytes, row_group_bytes, validate, skip_bad, max_pixels)
    image_size = _common_image_size(plan.sets)
    remove_outside_plan(out, len(plan.tasks))
    pairs, pair_rejects, pair_inputs = write_pairs(plan.sets, ids, out, validate, skip_bad, max_pixels)

    # The source hashes overlap the conversion: a thread reading and hashing releases the GIL. A source
    # converted as one range is hashed by that range instead, as it reads the file.
    handed_over = _hash_whole_sources_in_their_range(plan.tasks, plan.sources, source_hash)
    hasher = SourceHasher(
        source_files(plan.sets, plan.sources) + pair_inputs, out / DONE_DIR, source_hash, handed_over
    )
    hasher.start()
    try:
        results = run_tasks(plan.tasks, workers, runner)
    except BaseException:
        hasher.stop.set()
        raise
    delivered = {
        task["rec_path"]: result.get("source_digest")
        for task, result in zip(plan.tasks, results, strict=True)
        if "source_hash" in task
    }
    hashes = hasher.wait(delivered)

    rejects = [r for result in results for r in result["rejects"]] + plan.rejects + pair_rejects
    rejects_written = write_rejects(out, rejects, keep_file=skip_bad)
    manifest = build_manifest(
        results=results,
        source_entries=plan.sources,
        sets=plan.sets,
        pairs=pairs,
        hashes=hashes,
        rejects_count=len(rejects),
        rejects_written=rejects_written,
        image_size=image_size,
        color_order=color_order,
        settings={
            "target_bytes": int(target_bytes),
            "row_group_bytes": row_group_bytes,
            "validate": bool(validate),
            "skip_bad": bool(skip_bad),
            "source_hash": source_hash,
        },
    )
    dataset.write_manifest(manifest)
    manifest["_run"] = {  # about this run, not the data: not written to the manifest file
        "skipped_shards": sum(1 for r in results if r.get("skipped")),
        "source_hash_cache_hits": hasher.cache_hits,
    }
    return manifest


def _hash_whole_sources_in_their_range(tasks: list[dict], sources: list[dict], algorithm: str) -> set[str]:
    """Ask each source's range to hash its `.rec` when that range is the whole source; their paths."""
    handed_over = set()
    for entry in sources:
        first, stop = entry["shards"]
        if stop - first == 1:
            tasks[first]["source_hash"] = algorithm  # not fingerprinted: the shard does not depend on it
            handed_over.add(tasks[first]["rec_path"])
    return handed_over


def _common_image_size(sets: list[TrainingSet]) -> tuple[int, int] | None:
    """The sources' one image size (from `property`, else from decoding their first image)."""
    sizes = {ts.image_size or _probe_image_size(ts) for ts in sets} - {None}
    if len(sizes) > 1:
        raise DataError(f"sources have different image sizes {sorted(sizes)}; align them first")
    return sizes.pop() if sizes else None


def _probe_image_size(ts: TrainingSet) -> tuple[int, int] | None:
    """The size of the first of the first few images that reads and decodes (damaged ones are the
    conversion's to report)."""
    from facepipe.data.decode.parse import decode_or_none
    from facepipe.data.formats.insightface import PROBE_RECORDS, readable_records
    from facepipe.data.formats.recordio import IndexedRecordFile

    with IndexedRecordFile(ts.rec_path, ts.idx_path) as rec:
        for _, payload in readable_records(rec, ts.image_keys[:PROBE_RECORDS]):
            pixels = decode_or_none(payload)
            if pixels is not None:
                return int(pixels.shape[0]), int(pixels.shape[1])
    return None
