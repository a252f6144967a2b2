"""Attaching to Ray: a local instance on one machine, or a cluster by address.

Used by every part that runs Ray tasks or Ray Train (alignment, the training stages, benchmarks), so it
sits at the bottom of the package: nothing here knows about training.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Attach to Ray (`address`: None starts a local instance, else "auto" / "host:port" / "ray://...").

    Returns True when this call started or attached Ray (so the caller should shut it down).

    The standard AWS variables set here go to every task and actor of the job (the one place they
    are forwarded): nodes reach object storage (`s3://` shards, checkpoints) as the driver does.
    A `ray://` address attaches through the head's Ray Client server.
    """
    import ray

    from facepipe.storage import aws_env

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    env = aws_env()
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    try:
        ray.init(**kwargs)
    except ConnectionError as err:
        # the head starts one Ray Client server per connection and gives it a fixed time to come
        # up, which a loaded head can miss ("Starting Ray client server failed"): try once more
        if not str(address or "").startswith("ray://") or "client server failed" not in str(err):
            raise
        time.sleep(2.0)
        ray.init(**kwargs)
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """`ensure_ray` for the duration of a block; shuts Ray down only if this block started it."""
    import ray

    started = ensure_ray(address, num_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
