"""Prefect tasks around facepipe's stages; the work itself is `facepipe.orchestration`.

Every stage runs the same command the DVC pipeline and a user at a shell would run, so the three front
doors cannot drift apart. What Prefect adds here is operational:

- retries: a stage that fails transiently (crash, lost Ray node, network) is retried; a user error
  (exit code 2: bad input or configuration) is not, since rerunning cannot fix it;
- completed-stage check: a stage whose fingerprint matches an earlier successful run (and whose outputs
  still exist) is skipped, so finished work is never redone;
- links: each stage reports the MLflow runs it created, and flows publish them as an artifact.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from facepipe.orchestration import dvc, registry
from facepipe.orchestration.settings import absolute_tracking_uri
from facepipe.orchestration.stage_cache import LOG_DIR, completed, fingerprint, write_marker
from facepipe.orchestration.stage_process import StageFailed, run_logged


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow/task run; a plain logger when called as `task.fn(...)`."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("flows")


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry anything except a stage that reported bad input/configuration."""
    try:
        state.result()
    except StageFailed as err:
        return not err.permanent
    except Exception:
        return True
    return True


@task(
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_unless_user_error,
    cache_policy=NO_CACHE,
    task_run_name="{name}",
)
def run_stage(
    name: str,
    argv: list[str],
    workdir: str,
    deps: list[str] | None = None,
    outs: list[str] | None = None,
    params: Any = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run `facepipe <argv>` in `workdir` unless an identical earlier run completed.

    Returns {name, skipped, seconds, mlflow_runs, log}; raises StageFailed on a non-zero exit.
    """
    logger = _logger()
    wd = Path(workdir).resolve()
    deps, outs = list(deps or []), list(outs or [])
    fp = fingerprint(argv, params, deps, wd)
    done = completed(wd, name, fp, outs)
    if done is not None:
        logger.info("stage %s is up to date (finished %s); not rerun", name, done.get("finished"))
        return {**done, "skipped": True}

    log_path = wd / LOG_DIR / f"{name}.log"
    logger.info("stage %s: facepipe %s (cwd %s; full log %s)", name, " ".join(argv), wd, log_path)
    started_ms = int(time.time() * 1000)
    started = time.monotonic()
    tail = run_logged(name, argv, wd, log_path, logger.info, env)
    runs: list[dict[str, Any]] = []
    if tracking_uri and experiment:
        runs = registry.mlflow_runs_since(absolute_tracking_uri(tracking_uri, wd), experiment, started_ms)
    record = {
        "name": name,
        "fingerprint": fp,
        "argv": argv,
        "outs": outs,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - started, 1),
        "mlflow_runs": runs,
        "log": str(log_path),
        "tail": tail[-15:],
    }
    write_marker(wd, name, record)
    return {**record, "skipped": False}


@task(retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE)
def dvc_version(workdir: str, path: str, remote: str | None = None) -> dict[str, Any]:
    """`dvc add PATH` then `dvc push` to the remote; returns the md5, size and file count DVC recorded."""
    result = dvc.version_folder(workdir, path, remote)
    _logger().info("data version of %s: md5 %s (%s files)", path, result["md5"], result["nfiles"])
    return result


# A registered version of a model with all its aliases (see `registry.model_version`).
registered_model = task(
    registry.model_version, name="registered_model", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE
)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def move_champion(
    tracking_uri: str, workdir: str, name: str, scores: dict[str, float | None], metric: str
) -> dict[str, Any]:
    """`champion` to the best-scoring benchmarked version of `name` (see `registry.choose_champion`)."""
    result = registry.choose_champion(tracking_uri, workdir, name, scores, metric)
    if result["moved"]:
        moved = (name, result["champion"], metric, result["previous"])
        _logger().info("%s: champion -> v%s (by %s; was v%s)", *moved)
    return result


def publish_links(
    key: str, title: str, stages: list[dict[str, Any]], extra: dict[str, Any] | None = None
) -> None:
    """A markdown artifact on the flow run linking each stage to its MLflow runs."""
    lines = [f"# {title}", "", "| stage | status | seconds | MLflow runs |", "|---|---|---|---|"]
    for stage in stages:
        runs = ", ".join(
            f"`{r['run_id']}` ({r['stage'] or r['run_name']}): {r['url']}" for r in stage["mlflow_runs"]
        )
        status = "up to date (skipped)" if stage.get("skipped") else "ran"
        lines.append(f"| {stage['name']} | {status} | {stage.get('seconds', '')} | {runs or '-'} |")
    for label, value in (extra or {}).items():
        lines += ["", f"**{label}**: {value}"]
    create_markdown_artifact(markdown="\n".join(lines), key=key, description=title)
