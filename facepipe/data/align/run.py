"""Running the align job: image folders or shards of unaligned images -> aligned training shards.

`run_align` plans the job (facepipe.data.align.plan), runs the chunks that have no done marker yet
(`align_chunk` of facepipe.data.align.worker: in this process, a process pool, or as Ray tasks), then
merges the chunk files into OUT (facepipe.data.align.merge). A re-run after an interruption resumes from
the finished chunks; a re-run of a complete job does nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from facepipe import storage
from facepipe.cluster import ray_session, require_shared_paths
from facepipe.data.align.geometry import get_template
from facepipe.data.align.merge import merge_chunks
from facepipe.data.align.plan import (
    AlignSettings,
    ChunkTask,
    hash_input,
    make_tasks,
    missing_landmarks,
    plan_digest,
    plan_job,
    read_json,
)
from facepipe.data.align.worker import align_chunk, chunk_paths
from facepipe.data.shards import MANIFEST_NAME
from facepipe.errors import FacepipeError
from facepipe.fsutil import escape_name

__all__ = ["run_align", "run_tasks"]

log = logging.getLogger("facepipe.align")


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one image at a time per process; processes give the parallelism


def _take(iterator: Iterator, n: int) -> list:
    out = []
    for item in iterator:
        out.append(item)
        if len(out) >= n:
            break
    return out


def run_tasks(
    tasks: Sequence[ChunkTask], workers: int = 1, executor: str = "processes", ray_address: str | None = None
) -> Iterator[dict]:
    """Yield each task's stats as it finishes. At most 2*workers tasks are in flight (flat memory).

    `executor="ray"` runs `align_chunk` as Ray tasks: on a local Ray with `workers` CPUs, or on the
    cluster at `ray_address` ("auto", "host:port", "ray://..."), where `workers` bounds the tasks in flight.
    """
    if executor == "ray":
        with ray_session(ray_address, num_cpus=max(1, workers)):
            # tasks read the source (and the detector model) and write chunk files where they run
            inputs = {os.path.join(t.source, t.shard) for t in tasks}
            inputs |= {t.settings.detector_model for t in tasks}
            require_shared_paths(sorted(p for p in inputs if p), {t.work_dir for t in tasks})
            yield from _run_tasks_ray(tasks, workers)
        return
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield align_chunk(task)
        return
    import concurrent.futures as cf
    from concurrent.futures.process import BrokenProcessPool

    from facepipe.data.worker_pool import WatchedPool

    # workers die with this process (even SIGKILLed); a dead worker is named by its chunk
    with WatchedPool(workers, initializer=_init_worker) as pool:
        pending = iter(tasks)
        running = {pool.submit(align_chunk, t.index, t): t for t in _take(pending, 2 * workers)}
        try:
            while running:
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    result = future.result()  # before it leaves `running`: a broken pool names its chunk
                    running.pop(future)
                    yield result
                running |= {pool.submit(align_chunk, t.index, t): t for t in _take(pending, len(done))}
        except BrokenProcessPool:
            dead = pool.dead_labels({t.index for t in running.values()})
            raise FacepipeError(
                "an align worker process died (killed, or out of memory) while aligning chunk(s) "
                f"{', '.join(map(str, dead)) or '?'} (their inputs: {tasks[0].work_dir}/plan.json); the "
                "finished chunks are kept: run the same command again to resume"
            ) from None


def _run_tasks_ray(tasks: Sequence[ChunkTask], workers: int) -> Iterator[dict]:
    import ray

    remote = ray.remote(num_cpus=1)(align_chunk)
    pending = iter(tasks)
    window = max(2, 2 * workers)
    running = [remote.remote(t) for t in _take(pending, window)]
    while running:
        done, running = ray.wait(running, num_returns=1)
        for ref in done:
            yield ray.get(ref)
        running += [remote.remote(t) for t in _take(pending, len(done))]


def _check_settings(src: str | os.PathLike, out: Path, settings: AlignSettings) -> AlignSettings:
    """Configuration errors before any work; fills in the dataset name (SRC's folder name)."""
    get_template(settings.template)
    if settings.image_format not in ("jpg", "jpeg", "png"):
        raise FacepipeError(f"image format must be jpg or png, not {settings.image_format!r}")
    if not settings.dataset:
        name = escape_name(Path(src).resolve().name)  # Arrow strings must be valid UTF-8
        settings = AlignSettings(**{**settings.fingerprint(), "dataset": name})
    if settings.detector_model and not Path(settings.detector_model).is_file():
        raise FacepipeError(f"detector model not found: {settings.detector_model}")
    if Path(src).is_dir() and out.resolve().is_relative_to(Path(src).resolve()):
        raise FacepipeError(f"OUT ({out}) must not lie inside SRC ({src}): it would be read as an identity")
    return settings


def _require_detector_or_landmarks(plan: dict, settings: AlignSettings, table: dict | None) -> None:
    """Fail before any work when folder images lack landmarks and no detector is configured."""
    from facepipe.data.formats.landmarks import group_by_identity

    if plan["kind"] != "folders" or settings.detector_model:
        return
    missing, example = missing_landmarks(plan, group_by_identity(table or {}))
    if missing:
        raise FacepipeError(
            f"{missing} image(s) have no landmarks (e.g. {example}) and need face detection, but no "
            "detector model is configured: pass --detector-model PATH (a YuNet ONNX file) or set "
            "align.detector_model"
        )


def run_align(
    src: str | os.PathLike,
    out: str | os.PathLike,
    settings: AlignSettings | None = None,
    landmarks_file: str | os.PathLike | None = None,
    workers: int = 1,
    chunk_size: int = 500,
    target_bytes: int = 256 << 20,
    contact_sheet: bool = True,
    executor: str = "processes",
    pairs_files: Iterable[str | os.PathLike] = (),
    ray_address: str | None = None,
) -> dict:
    """Align every image of SRC into OUT (train shards, rejects, labels, manifest); resumable.

    `pairs_files`: verification pair lists (see `read_pairs_file`) turned into OUT/pairs/<name>.parquet
    tables of aligned crops, which training evaluates after each epoch.

    OUT may be a URI (`s3://bucket/aligned`): the job runs in a local staging folder (kept after a
    kill, so a rerun resumes there) and is published to OUT with the manifest last, so OUT holds a
    manifest only once every shard is there; a rerun against a published OUT does nothing.

    Returns a summary dict. Raises FacepipeError for configuration problems (no detector model where
    one is needed, an unfinished job in OUT with other settings, ...); bad images never stop the run.
    """
    options = dict(
        landmarks_file=landmarks_file, workers=workers, chunk_size=chunk_size, target_bytes=target_bytes,
        contact_sheet=contact_sheet, executor=executor, pairs_files=pairs_files, ray_address=ray_address,
    )  # fmt: skip
    if not storage.is_remote(out):
        return _align_into(src, Path(out), settings, **options)
    manifest = storage.join(out, MANIFEST_NAME)
    try:  # an unreachable store or a missing bucket fails now, not after the whole job
        published = storage.exists(manifest)
    except OSError as err:
        raise FacepipeError(f"cannot reach the output location {out}: {err}") from None
    with storage.local_staging(out) as staging:
        if published and not (staging / MANIFEST_NAME).is_file():
            # the published manifest decides, as a local one would: same plan → nothing to do
            (staging / MANIFEST_NAME).write_bytes(storage.read_bytes(manifest))
        result = _align_into(src, staging, settings, **options)
        if not result["skipped"]:
            try:
                result["published"] = storage.publish_tree(staging, out, MANIFEST_NAME)
            except OSError as err:
                raise FacepipeError(f"cannot publish the aligned dataset to {out}: {err}") from None
    return {**result, "out": os.fspath(out)}


def _align_into(
    src: str | os.PathLike,
    out: Path,
    settings: AlignSettings | None,
    landmarks_file: str | os.PathLike | None,
    workers: int,
    chunk_size: int,
    target_bytes: int,
    contact_sheet: bool,
    executor: str,
    pairs_files: Iterable[str | os.PathLike],
    ray_address: str | None,
) -> dict:
    """`run_align` into a local folder."""
    from facepipe.data.formats.landmarks import load_landmarks
    from facepipe.fsutil import clean_stale_temps, write_json_atomic
    from facepipe.progress import progress

    started = time.monotonic()
    settings = _check_settings(src, out, settings or AlignSettings())
    work = out / "_work"
    plan = plan_job(src, settings, chunk_size, landmarks_file)
    plan["pairs"] = [{"path": os.fspath(Path(p).resolve()), "sha256": hash_input(p)} for p in pairs_files]
    digest = plan_digest(plan)

    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        previous = read_json(manifest_path)
        if previous.get("align", {}).get("plan_digest") == digest:
            log.info("%s is already complete for this source and settings; nothing to do", out)
            return {
                "status": "complete",
                "skipped": True,
                "out": os.fspath(out),
                **previous["align"]["counts"],
            }
        raise FacepipeError(
            f"{out} already holds an aligned dataset from other inputs or settings; use another OUT"
        )

    plan_path = work / "plan.json"
    if plan_path.is_file() and read_json(plan_path).get("digest") != digest:
        raise FacepipeError(
            f"{out} holds an unfinished align job with another source, landmark file or settings "
            "(or SRC changed since); finish it with the same arguments, or use another OUT"
        )

    table = load_landmarks(landmarks_file) if landmarks_file else None
    _require_detector_or_landmarks(plan, settings, table)
    if not plan_path.is_file():
        write_json_atomic(plan_path, {"digest": digest, "plan": plan})
    clean_stale_temps(work)

    tasks = make_tasks(plan, work, table)
    todo = [t for t in tasks if not chunk_paths(work, t.index)[2].is_file()]
    if len(todo) < len(tasks):
        log.info("resuming: %d of %d chunks already done", len(tasks) - len(todo), len(tasks))
    for _stats in progress(
        run_tasks(todo, workers, executor, ray_address), total=len(todo), desc="align", unit="chunk"
    ):
        pass

    counts = merge_chunks(out, work, plan, digest, settings, tasks, target_bytes, contact_sheet)
    counts["seconds"] = round(time.monotonic() - started, 2)
    return {"status": "complete", "skipped": False, "out": os.fspath(out), **counts}
