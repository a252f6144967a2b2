"""Stopping a Ray Train run cleanly on a non-finite loss.

A NaN/inf loss is deterministic: raising it inside a worker would make Ray restart the worker group
from the last checkpoint up to `max_failures` times, hitting the same batch each time. Instead:

1. every rank sums a "my loss is non-finite" flag over the process group (`all_agree`, called by
   `facepipe.train.loop`), so all ranks take the same decision at the same step and none is left
   waiting in a collective;
2. a rank whose own loss is bad sends its record to the driver (`record_nonfinite`, through
   `facepipe.train.mailbox`: never a local path, which another node could not read), and every rank
   returns normally from its loop;
3. after `fit()` the driver raises the recorded error (`Mailbox.raise_nonfinite`), lowest rank first.
"""

from __future__ import annotations

from typing import Any

from facepipe.errors import NonFiniteLossError


def nonfinite_flag(loss: Any) -> float:
    """1.0 when any element of `loss` is NaN or infinite, else 0.0 (an input to `all_agree`)."""
    import torch

    return 0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0


def record_nonfinite(loss: Any, where: str, rank: int, step: int, events: Any) -> None:
    """If this rank's `loss` is non-finite, send its record (and an event) to the driver."""
    from facepipe.models.losses import check_finite

    try:
        check_finite(loss, where)
    except NonFiniteLossError as err:
        events.nonfinite(rank, step, str(err))
