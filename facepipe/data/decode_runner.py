"""Run the range tasks of `facepipe decode`: in this process, a local process pool, or a given runner."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from facepipe.data.decode_worker import convert_range
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
    import multiprocessing

    # spawn: the parent has a hashing thread, and fork with threads is unsafe.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending = list(reversed(tasks))
        running: set = set()
        try:
            # Keep at most 2 tasks per worker queued, so memory doesn't grow with the task count.
            while pending or running:
                while pending and len(running) < 2 * workers:
                    running.add(pool.submit(convert_range, pending.pop()))
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    running.discard(future)
                    yield future.result()
        except BaseException:
            for future in running:
                future.cancel()
            raise
