"""Prefect tasks that run facepipe stages: the `facepipe` CLI in a subprocess, DVC, the MLflow registry.

Every stage runs the same command the DVC pipeline and a user at a shell would run, so the three front
doors cannot drift apart. What Prefect adds here is operational:

- retries: a stage that fails transiently (crash, lost Ray node, network) is retried; a user error
  (exit code 2: bad input or configuration) is not, since rerunning cannot fix it;
- completed-stage check: after a stage succeeds a marker records the fingerprint of its command,
  parameters and inputs; when a flow is retried or run again with nothing changed, the stage is skipped
  (as long as its outputs still exist), so finished work is never redone;
- links: each stage reports the MLflow runs it created, and flows publish them as an artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from facepipe.fsutil import write_json_atomic

STATE_DIR = ".facepipe/stages"  # markers of completed stages, inside the flow's workdir
LOG_DIR = ".facepipe/logs"
USER_ERROR_EXIT = 2  # facepipe's exit code for FacepipeError/DataError


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow/task run; a plain logger when called as `task.fn(...)`."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("flows")


class StageFailed(RuntimeError):
    """A facepipe command exited non-zero; `permanent` when it reported a user error."""

    def __init__(self, name: str, returncode: int, tail: str, log_path: Path):
        self.returncode = returncode
        self.permanent = returncode == USER_ERROR_EXIT
        kind = "user error (not retried)" if self.permanent else "failure"
        super().__init__(f"stage {name}: {kind}, exit code {returncode}; log {log_path}\n{tail}")


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry anything except a stage that reported bad input/configuration."""
    try:
        state.result()
    except StageFailed as err:
        return not err.permanent
    except Exception:
        return True
    return True


# ------------------------------------------------------------------------------------- fingerprints


def path_state(path: str | os.PathLike) -> Any:
    """A cheap, content-sensitive description of an input: DVC md5, manifest hash, or file listing.

    Stage outputs carry a manifest (decode/align) or are DVC-tracked (the raw dataset), which pins
    their content without re-reading gigabytes; otherwise sizes and modification times stand in.
    """
    p = Path(path)
    dvc_file = p.with_name(p.name + ".dvc")
    if dvc_file.is_file():
        return {"dvc": hashlib.sha256(dvc_file.read_bytes()).hexdigest()}
    if (p / "manifest.json").is_file():
        return {"manifest": hashlib.sha256((p / "manifest.json").read_bytes()).hexdigest()}
    if p.is_file():
        st = p.stat()
        return {"file": [st.st_size, st.st_mtime_ns]}
    if p.is_dir():
        listing = []
        for child in sorted(p.rglob("*")):
            if child.is_file():
                st = child.stat()
                listing.append([str(child.relative_to(p)), st.st_size, st.st_mtime_ns])
        return {"dir": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    return {"missing": str(p)}


def stable_argv(argv: list[str]) -> list[str]:
    """The command minus where it runs: a Ray address changes no result (and differs per cluster)."""
    return [a for a in argv if ".scaling.address=" not in a]


def fingerprint(argv: list[str], params: Any, deps: list[str], workdir: Path) -> str:
    state = {
        "argv": stable_argv(argv),
        "params": params,
        "deps": {d: path_state(d if Path(d).is_absolute() else workdir / d) for d in deps},
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def marker_path(workdir: Path, name: str) -> Path:
    return workdir / STATE_DIR / f"{name}.json"


def completed(workdir: Path, name: str, fp: str, outs: list[str]) -> dict[str, Any] | None:
    """The marker of an earlier successful run of this exact stage, if its outputs are still there."""
    marker = marker_path(workdir, name)
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != fp:
        return None
    if not all((workdir / o).exists() for o in outs):
        return None
    return record


# ------------------------------------------------------------------------------------------ MLflow


def absolute_tracking_uri(uri: str, workdir: str | os.PathLike) -> str:
    """`sqlite:///mlflow.db` (relative to the stage's cwd) as an absolute URI the flow process can use."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((Path(workdir) / uri[len(prefix) :]).resolve())
    if "://" not in uri and not uri.startswith("databricks"):
        return str((Path(workdir) / uri).resolve())
    return uri


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"runs:/{run_id} (open with: mlflow ui --backend-store-uri {tracking_uri})"


def mlflow_runs_since(tracking_uri: str, experiment: str, since_ms: int) -> list[dict[str, Any]]:
    """The runs created in `experiment` since `since_ms` (epoch ms): what a stage just logged."""
    from mlflow import MlflowClient

    mlc = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = mlc.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = mlc.search_runs([exp.experiment_id], filter_string=f"attributes.start_time >= {since_ms}")
    return [
        {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "stage": r.data.tags.get("stage", ""),
            "status": r.info.status,
            "url": run_url(tracking_uri, exp.experiment_id, r.info.run_id),
        }
        for r in runs
    ]


# ------------------------------------------------------------------------------------------- tasks


def _command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "facepipe", *argv]


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
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = _command(argv)
    logger.info("stage %s: %s (cwd %s)", name, " ".join(cmd[2:]), wd)
    started_ms = int(time.time() * 1000)
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=40)
    # progress bars redraw with carriage returns, which would become hundreds of log lines here
    quiet = {"PYTHONUNBUFFERED": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    child_env = {**os.environ, **quiet, **(env or {})}
    with open(log_path, "a") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=wd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:  # stream, so long stages show progress in the Prefect UI
                log_file.write(line)
                tail.append(line.rstrip())
                logger.info("%s | %s", name, line.rstrip())
            returncode = proc.wait()
        finally:
            # cancelled, timed out or interrupted: the stage must not outlive its task
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if returncode != 0:
        raise StageFailed(name, returncode, "\n".join(tail), log_path)

    runs: list[dict[str, Any]] = []
    if tracking_uri and experiment:
        runs = mlflow_runs_since(absolute_tracking_uri(tracking_uri, wd), experiment, started_ms)
    record = {
        "name": name,
        "fingerprint": fp,
        "argv": argv,
        "outs": outs,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - started, 1),
        "mlflow_runs": runs,
        "log": str(log_path),
        "tail": list(tail)[-15:],
    }
    write_json_atomic(marker_path(wd, name), record)
    return {**record, "skipped": False}


def _dvc(args: list[str], cwd: Path) -> str:
    dvc = Path(sys.executable).parent / "dvc"
    proc = subprocess.run(
        [str(dvc) if dvc.is_file() else "dvc", *args],
        cwd=cwd,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"dvc {' '.join(args)} failed in {cwd} ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


@task(retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE)
def dvc_version(workdir: str, path: str, remote: str | None = None) -> dict[str, Any]:
    """`dvc add PATH` then `dvc push` to the remote; returns the md5, size and file count DVC recorded.

    `dvc add` on an unchanged folder is a no-op and `dvc push` only sends missing objects, so a retry
    or a second run costs one hash check.
    """
    import yaml

    wd = Path(workdir).resolve()
    if not (wd / ".dvc").is_dir():
        raise RuntimeError(f"{wd} is not a DVC project: run `dvc init` and add a remote (or use the demo)")
    _dvc(["add", path], wd)
    dvc_file = wd / f"{path}.dvc"
    _dvc(["push", str(dvc_file.relative_to(wd)), *(["--remote", remote] if remote else [])], wd)
    out = (yaml.safe_load(dvc_file.read_text())["outs"] or [{}])[0]
    result = {
        "path": path,
        "dvc_file": str(dvc_file),
        "md5": out.get("md5"),
        "size": out.get("size"),
        "nfiles": out.get("nfiles"),
        "remote": remote or "default",
    }
    _logger().info("data version of %s: md5 %s (%s files)", path, result["md5"], result["nfiles"])
    return result


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def registered_model(
    tracking_uri: str,
    workdir: str,
    name: str,
    alias: str | None = None,
    version: str | None = None,
    run_ids: list[str] | None = None,
) -> dict[str, Any]:
    """A registered version of `name` with all its aliases: by alias, by version, the version logged
    by one of `run_ids`, or else the newest."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = absolute_tracking_uri(tracking_uri, workdir)
    mlc = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if alias:
            mv = mlc.get_model_version_by_alias(name, alias)
        elif version:
            mv = mlc.get_model_version(name, str(version))
        else:
            versions = mlc.search_model_versions(f"name = '{name}'")
            if run_ids:
                versions = [v for v in versions if v.run_id in set(run_ids)] or versions
            if not versions:
                raise RuntimeError(f"no version of {name} is registered in {uri}")
            mv = max(versions, key=lambda v: int(v.version))
    except MlflowException as err:
        wanted = f"{name}@{alias}" if alias else f"{name} version {version}" if version else name
        raise RuntimeError(f"{wanted} is not in the model registry {uri}: {err}") from err
    mv = mlc.get_model_version(name, mv.version)  # search results carry no aliases
    metrics = {}
    if mv.run_id:
        with contextlib.suppress(MlflowException):
            metrics = dict(mlc.get_run(mv.run_id).data.metrics)
    return {
        "name": name,
        "version": str(mv.version),
        "aliases": sorted(getattr(mv, "aliases", []) or []),
        "run_id": mv.run_id,
        "uri": f"models:/{name}/{mv.version}",
        "tags": dict(mv.tags or {}),
        "metrics": metrics,  # the final metrics of the run that logged this version
    }


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


# ------------------------------------------------------------------------------------ flow settings


class FlowSettings:
    """A flow's workdir, parameter file and overrides, and the typed config they give.

    Every stage command that reads params.yaml gets the same `--config FILE section.key=value ...`, so
    what the flow fingerprints is what the stage runs with.
    """

    def __init__(self, workdir: str, params: str, overrides: list[str] | None = None):
        from facepipe.config import load_config

        self.workdir = str(Path(workdir).resolve())
        path = Path(params)
        self.params = str(path if path.is_absolute() else Path(self.workdir) / path)
        self.overrides = list(overrides or [])
        config = load_config(self.params, self.overrides)
        # Ray Train workers run in Ray's own folder, where relative paths (and a relative
        # sqlite:///mlflow.db) would name other, empty places: pin them to the workdir
        for key, value in config.paths.model_dump().items():
            if not Path(value).is_absolute():
                self.overrides.append(f"paths.{key}={Path(self.workdir) / value}")
        uri = config.tracking.tracking_uri
        if absolute_tracking_uri(uri, self.workdir) != uri:
            self.overrides.append(f"tracking.tracking_uri={absolute_tracking_uri(uri, self.workdir)}")
        self.config = load_config(self.params, self.overrides)

    def with_overrides(self, extra: list[str]) -> FlowSettings:
        return FlowSettings(self.workdir, self.params, self.overrides + extra)

    def config_args(self) -> list[str]:
        """`--config FILE` then the overrides; the overrides are positional, so these go last."""
        return ["--config", self.params, *self.overrides]

    def section(self, name: str) -> Any:
        """A config section as plain data, minus where it runs (the Ray address changes no result)."""
        data = getattr(self.config, name).model_dump(mode="json")
        if isinstance(data.get("scaling"), dict):
            data["scaling"].pop("address", None)
        return data

    def ray_env(self, ray_address: str | None) -> dict[str, str]:
        """RAY_ADDRESS for stage commands, so every Ray helper process attaches to that cluster."""
        return {"RAY_ADDRESS": ray_address} if ray_address else {}

    @property
    def tracking(self) -> dict[str, str]:
        return {
            "tracking_uri": self.config.tracking.tracking_uri,
            "experiment": self.config.tracking.experiment,
        }


def run_name(prefix: str, params: Any, deps: list[str], workdir: str) -> str:
    """A training run name fixed by the stage's inputs: rerunning after a crash (a retry, or a new flow
    run with the same inputs) reuses it, and the training stage resumes from that run's checkpoint."""
    return f"{prefix}-{fingerprint([prefix], params, deps, Path(workdir))[:10]}"


def cli_supports(command: list[str], option: str) -> bool:
    """Whether `facepipe <command> --help` lists `option` (for stages other issues are still adding)."""
    proc = subprocess.run(_command([*command, "--help"]), capture_output=True, text=True, timeout=120)
    return proc.returncode == 0 and option in proc.stdout


def scaling_overrides(
    section: str, ray_address: str | None, num_workers: int | None, use_gpu: bool | None
) -> list[str]:
    """`params.yaml` overrides for a training section's Ray scaling, from flow parameters."""
    out = []
    if ray_address:
        out.append(f"{section}.scaling.address={ray_address}")
    if num_workers is not None:
        out.append(f"{section}.scaling.num_workers={int(num_workers)}")
    if use_gpu is not None:
        out.append(f"{section}.scaling.use_gpu={'true' if use_gpu else 'false'}")
    return out
