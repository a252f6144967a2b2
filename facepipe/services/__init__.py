"""Local services for the demo and the tests: a Prefect server and worker, local Ray, MLflow, a DVC remote.

Every `start_*` returns a handle whose `stop()` ends exactly the processes that call started (each runs
in its own process group, so children such as Ray's raylet go too) and nothing else: other Ray
clusters or Prefect servers on the machine are left alone. Handles are context managers and are also
stopped at interpreter exit, so an exception between start and stop leaks nothing.

This module starts the services as command-line programs; it never imports Prefect (facepipe itself
stays free of the orchestrator).
"""

from facepipe.services.prefect_server import (
    ensure_process_pool,
    prefect_env,
    run_prefect,
    start_prefect_server,
    start_prefect_worker,
)
from facepipe.services.process import ServiceHandle, _bin, _spawn, _wait_until, free_port, http_ok
from facepipe.services.ray_head import start_ray_head
from facepipe.services.stores import ensure_dvc_repo, mlflow_local, start_mlflow_server

__all__ = [
    "ServiceHandle",
    # the private ones are for tests that start their own processes
    "_bin",
    "_spawn",
    "_wait_until",
    "ensure_dvc_repo",
    "ensure_process_pool",
    "free_port",
    "http_ok",
    "mlflow_local",
    "prefect_env",
    "run_prefect",
    "start_mlflow_server",
    "start_prefect_server",
    "start_prefect_worker",
    "start_ray_head",
]
