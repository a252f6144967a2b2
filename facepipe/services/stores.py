"""MLflow (SQLite, or a tracking server over HTTP) and a DVC project with a local remote."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

from facepipe import storage
from facepipe.errors import FacepipeError
from facepipe.services.process import ServiceHandle, _bin, _spawn, _wait_until, free_port, http_ok

# ---------------------------------------------------------------------------------------------- MLflow


def mlflow_local(root: str | os.PathLike) -> ServiceHandle:
    """MLflow on SQLite in `root`: nothing runs, so stop() has nothing to end.

    info: tracking_uri (sqlite:///<root>/mlflow.db), artifacts (<root>/artifacts), ui_command.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    artifacts = root / "artifacts"
    info = {
        "tracking_uri": tracking_uri,
        "artifacts": str(artifacts),
        "ui_command": f"mlflow ui --backend-store-uri {tracking_uri} --default-artifact-root {artifacts}",
    }
    return ServiceHandle(name="mlflow (sqlite)", info=info)


def start_mlflow_server(
    backend_uri: str,
    artifacts_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int | None = None,
    log_path: str | os.PathLike | None = None,
    timeout_s: float = 180.0,
    auth: bool = False,
) -> ServiceHandle:
    """An MLflow tracking server (UI + REST + artifact proxy) over `backend_uri`. info: url.

    With `auth`, MLflow's basic-auth app: a request without a known user and password is refused
    (401). Its admin is the user MLflow clients already name, `MLFLOW_TRACKING_USERNAME` /
    `MLFLOW_TRACKING_PASSWORD`, so the password reaches the server through its environment only
    (never a file); the user store is a SQLite file beside the artefacts.
    """
    port = port or free_port(host)
    artifacts = Path(artifacts_dir).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        _bin("mlflow"), "server", "--host", host, "--port", str(port), "--workers", "1",
        "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
    ]  # fmt: skip
    # MLflow's job runner (GenAI evaluation jobs, trace roll-ups) is two more process pools that
    # facepipe never uses; an operator who wants it sets the variable to true
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    if auth:
        cmd += ["--app-name", "basic-auth"]
        env |= _basic_auth_env(artifacts.parent)
    log = Path(log_path or artifacts.parent / "mlflow.log")
    handle = _spawn(f"mlflow server {host}:{port}", cmd, env, log)
    url = f"http://{host}:{port}"
    handle.info.update(url=url, tracking_uri=url, auth=auth)
    _wait_until(handle, lambda: http_ok(f"{url}/health"), timeout_s, "healthy server")
    return handle


def _basic_auth_env(root: Path) -> dict[str, str]:
    """The basic-auth app's settings file (no secret in it) and the variables that carry the rest."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not user or not password:
        raise FacepipeError(
            "an MLflow server with auth needs its admin user: set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (the variables MLflow clients send)"
        )
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        f"admin_username = {user}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        # each check of a password is a deliberately slow hash (~0.8 s on this machine), paid by every
        # request without this cache: a run logging a metric per step would spend most of its time on
        # it. The price is a short window in which a changed password still works.
        "auth_cache_ttl_seconds = 60\n"
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        # signs the UI's forms (CSRF); one server, so a key of its own per start is enough
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
        or secrets.token_hex(16),
    }


# ------------------------------------------------------------------------------------------------- DVC


def _dvc(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    proc = subprocess.run([_bin("dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise FacepipeError(
            f"dvc {' '.join(args)} in {cwd} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def ensure_dvc_repo(
    workdir: str | os.PathLike, remote_dir: str | os.PathLike, remote_name: str = "local"
) -> ServiceHandle:
    """Make `workdir` a DVC project whose default remote is `remote_dir` (a folder or a URI).

    A git work tree root gets a normal `dvc init`; any other folder (e.g. a demo folder inside a clone)
    gets `dvc init --no-scm`, so its files never touch the surrounding repository. Nothing runs, so the
    handle's stop() is a no-op. info: root, remote, remote_url.
    """
    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if storage.is_remote(remote_dir):  # object storage (s3://…): credentials from the AWS variables
        remote = os.fspath(remote_dir)
    else:
        remote = str(Path(remote_dir).resolve())
        Path(remote).mkdir(parents=True, exist_ok=True)
    if not (root / ".dvc").is_dir():
        _dvc(["init"] if (root / ".git").exists() else ["init", "--no-scm"], root)
        _dvc(["config", "core.analytics", "false"], root)
    _dvc(["remote", "add", "--default", "--force", remote_name, remote], root)
    return ServiceHandle(
        name=f"dvc remote {remote_name}",
        info={"root": str(root), "remote": remote_name, "remote_url": remote},
    )
