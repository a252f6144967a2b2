"""Run the range tasks of `facepipe decode`: in this process, a local process pool, or a given runner."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, wait

from facepipe.data.decode.worker import convert_range
from facepipe.errors import DataError

__all__ = ["Runner", "run_tasks"]

# runs convert_range over the tasks (local pool, Ray, ...) and yields the results in any order
Runner = Callable[[Callable[[dict], dict], list[dict]], Iterable[dict]]


def run_tasks(tasks: list[dict], workers: int, runner: Runner | None = None) -> list[dict]:
    """Every task's result, in task order, with progress shown while they finish."""
    from facepipe.progress import progress

    if runner is not None:
        results = runner(convert_range, tasks)
    elif workers <= 1 or len(tasks) <= 1:
        results = (convert_range(task) for task in tasks)
    else:
        results = _process_pool(tasks, workers)
    by_index = {r["index"]: r for r in progress(results, total=len(tasks), desc="decode", unit="shard")}
    missing = sorted(set(range(len(tasks))) - set(by_index))
    if missing:
        raise DataError(f"the task runner returned no result for ranges {missing[:5]}")
    return [by_index[i] for i in sorted(by_index)]


def _process_pool(tasks: list[dict], workers: int) -> Iterator[dict]:
    from concurrent.futures.process import BrokenProcessPool

    from facepipe.data.worker_pool import WatchedPool

    with WatchedPool(workers) as pool:
        pending = list(reversed(tasks))
        running: dict = {}
        try:
            # Keep at most 2 tasks per worker queued, so memory doesn't grow with the task count.
            while pending or running:
                while pending and len(running) < 2 * workers:
                    task = pending.pop()
                    running[pool.submit(convert_range, task["index"], task)] = task
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    result = future.result()  # before it leaves `running`: a broken pool names its range
                    running.pop(future)
                    yield result
        except BrokenProcessPool:
            by_index = {t["index"]: t for t in running.values()}
            dead = [describe_range(by_index[i]) for i in pool.dead_labels(set(by_index))]
            raise DataError(
                f"a decode worker process died (killed, or out of memory) while converting "
                f"{'; '.join(dead) or 'a range'}; the finished ranges are kept: run the same command "
                "again to resume"
            ) from None
        except BaseException:
            for future in running:
                future.cancel()
            raise


def describe_range(task: dict) -> str:
    """A range as a user finds it again: its number, file, keys and bytes."""
    keys, offsets = task["keys"], task["offsets"]
    return (
        f"range {task['index']} ({task['rec_path']}, keys {int(keys.min())}..{int(keys.max())}, "
        f"bytes {int(offsets.min())}..{int(task['ends'].max())})"
    )


def ray_runner(
    address: str | None,
    location: str | None = None,
    sources: Sequence[str | os.PathLike] = (),
    out_dir: str | os.PathLike | None = None,
) -> Runner:
    """A runner that converts the ranges as Ray tasks on the cluster at `address` ("host:port", "auto",
    "ray://host:port"; None: a local instance). The local `sources` and a local `out_dir` must be the
    same on every node (checked before any task starts). With `location` (the output URI), each task
    uploads its own shard there, since a node's disk is not the driver's; the driver publishes the
    rest and the manifest last.
    """

    def run(fn: Callable[[dict], dict], tasks: list[dict]) -> Iterator[dict]:
        import ray

        from facepipe.cluster import ray_session, require_shared_paths

        with ray_session(address):
            require_shared_paths(sources, [out_dir] if out_dir is not None and location is None else [])
            remote = ray.remote(num_cpus=1, max_retries=1)(_convert_and_upload)
            pending = [remote.remote(fn, task, location) for task in tasks]
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])

    return run


def _convert_and_upload(fn: Callable[[dict], dict], task: dict, location: str | None) -> dict:
    """`fn(task)`, then (with `location`) its shard uploaded to `location/train/` unless already there."""
    result = fn(task)
    if location is not None:
        from facepipe import storage
        from facepipe.data.decode.resume import shard_path

        local, target = shard_path(task), storage.join(location, result["shard"]["path"])
        fs, path = storage.resolve(target)
        if fs.get_file_info(path).size != result["shard"]["bytes"]:
            fs.create_dir(path.rpartition("/")[0], recursive=True)
            with open(local, "rb") as src, fs.open_output_stream(path) as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
    return result
