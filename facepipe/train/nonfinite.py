"""Stopping a Ray Train run cleanly on a non-finite loss.

A NaN/inf loss is deterministic: raising it inside a worker would make Ray restart the worker group
from the last checkpoint up to `max_failures` times, hitting the same batch each time. Instead:

1. every rank sums a "my loss is non-finite" flag over the process group (`all_agree`, called by
   `facepipe.train.loop`), so all ranks take the same decision at the same step and none is left
   waiting in a collective;
2. a rank whose own loss is bad writes `nonfinite-rank{r}.json` into the run's error directory
   (`record_nonfinite`), and every rank returns normally from its loop;
3. after `fit()` the driver raises the recorded error (`raise_recorded_failure`), lowest rank first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from facepipe.errors import NonFiniteLossError
from facepipe.fsutil import write_json_atomic

RECORD_GLOB = "nonfinite-rank*.json"


def nonfinite_flag(loss: Any) -> float:
    """1.0 when any element of `loss` is NaN or infinite, else 0.0 (an input to `all_agree`)."""
    import torch

    return 0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0


def record_nonfinite(loss: Any, where: str, error_dir: str | Path, rank: int, step: int, events: Any) -> None:
    """If this rank's `loss` is non-finite, leave its error record (and an event) for the driver."""
    from facepipe.models.losses import check_finite

    try:
        check_finite(loss, where)
    except NonFiniteLossError as err:
        write_json_atomic(Path(error_dir) / f"nonfinite-rank{rank}.json", {"message": str(err), "step": step})
        events.write(event="nonfinite", rank=rank, step=step + 1, message=str(err))


def clear_records(error_dir: Path) -> None:
    """Create `error_dir`, dropping records left by an earlier attempt of the same run name."""
    error_dir.mkdir(parents=True, exist_ok=True)
    for stale in error_dir.glob(RECORD_GLOB):
        stale.unlink()


def raise_recorded_failure(error_dir: str | Path) -> None:
    """Raise the non-finite-loss error a worker recorded (lowest rank first), if any."""
    records = sorted(Path(error_dir).glob(RECORD_GLOB), key=lambda p: int(p.stem.split("rank")[1]))
    if records:
        raise NonFiniteLossError(json.loads(records[0].read_text())["message"])
