"""Attaching to Ray: a local instance on one machine, or a cluster by address.

Used by every part that runs Ray tasks or Ray Train (alignment, the training stages, benchmarks), so it
sits at the bottom of the package: nothing here knows about training.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

# what an MLflow client on a node needs to log in to a tracking server with auth, as the driver does
MLFLOW_CLIENT_VARIABLES = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Attach to Ray (`address`: None starts a local instance, else "auto" / "host:port" / "ray://...").

    Returns True when this call started or attached Ray (so the caller should shut it down).

    The standard AWS variables set here go to every task and actor of the job (the one place they
    are forwarded): nodes reach object storage (`s3://` shards, checkpoints) as the driver does; so
    do MLflow's login variables, for a tracking server with auth.
    A `ray://` address attaches through the head's Ray Client server.
    """
    import ray

    from facepipe.storage import aws_env

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    env = aws_env() | {k: os.environ[k] for k in MLFLOW_CLIENT_VARIABLES if os.environ.get(k)}
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


_CHECK_PREFIX = ".facepipe-node-check-"


def _view(path: str) -> tuple:
    """What this process sees at a local `path`: missing, a file's size, or a folder's top-level files."""
    if os.path.isfile(path):
        return ("file", os.path.getsize(path))
    if os.path.isdir(path):
        with os.scandir(path) as entries:
            files = sorted((e.name, e.stat().st_size) for e in entries if e.is_file())
        return ("folder", tuple(files[:2000]))
    return ("missing",)


def _views(paths: list[str]) -> dict[str, tuple]:
    return {p: _view(p) for p in paths}


def require_shared_paths(
    paths: Iterable[str | os.PathLike], outputs: Iterable[str | os.PathLike] = ()
) -> None:
    """Fail unless every alive node of the attached Ray cluster sees the local `paths` (inputs) and
    `outputs` (folders tasks write into) as this process does.

    A cluster's nodes share no disk unless one is mounted on each: a task on another node would read
    nothing (or another node's file of the same name) and write where the driver never looks. URIs
    (`s3://…`) are skipped; an output folder is checked through a token file written here first.
    Each node is asked by one zero-CPU task pinned to it; on a single machine this always passes.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from facepipe.errors import FacepipeError
    from facepipe.storage import is_remote

    inputs = [os.fspath(p) for p in paths if not is_remote(p)]
    folders = [os.fspath(p) for p in outputs if not is_remote(p)]
    tokens = []
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
        token = os.path.join(folder, _CHECK_PREFIX + uuid.uuid4().hex)
        with open(token, "w") as handle:
            handle.write("facepipe: checking that every Ray node sees this folder\n")
        tokens.append(token)
    try:
        wanted = {p: _view(p) for p in inputs + tokens}
        if not wanted:
            return
        probe = ray.remote(num_cpus=0, max_retries=0)(_views)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        # one probe per node, by node id: nodes of one host share an address
        refs = [
            (n["NodeManagerAddress"], probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(list(wanted)))
            for n in nodes
        ]  # fmt: skip
        for node, ref in refs:
            seen = ray.get(ref, timeout=120)
            for path, view in wanted.items():
                if seen[path] != view:
                    shown = os.path.dirname(path) if path in tokens else path
                    raise FacepipeError(
                        f"{shown} is not the same on Ray node {node} as here: the cluster's nodes "
                        "share no disk, so put it on object storage (s3://…) or on a filesystem every "
                        "node mounts at the same path"
                    )
    finally:
        for token in tokens:
            with contextlib.suppress(OSError):
                os.remove(token)
