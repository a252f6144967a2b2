"""Progress reporting for long work (decode, align, train, evaluate).

A tqdm bar on stderr when attached to a terminal; otherwise periodic log lines, so CI logs and
Prefect task logs still show how far a job got without a wall of carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("facepipe.progress")


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it", every_s: float = 10.0
) -> Iterator[T]:
    """Iterate while showing progress; `every_s` is the log interval when not on a terminal."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    count = 0
    for item in iterable:
        yield item
        count += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            rate = count / max(now - start, 1e-9)
            of = f"/{total}" if total else ""
            log.info("%s: %d%s %s (%.1f %s/s)", desc, count, of, unit, rate, unit)
    elapsed = time.monotonic() - start
    log.info("%s: done, %d %s in %.1f s", desc, count, unit, elapsed)


def summary(title: str, lines: dict[str, object]) -> str:
    """Format the short end-of-job summary every long command prints."""
    width = max((len(k) for k in lines), default=0)
    body = "\n".join(f"  {key.ljust(width)}  {value}" for key, value in lines.items())
    return f"{title}\n{body}"
