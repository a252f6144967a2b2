"""Versioning a dataset folder with DVC (`dvc add` + `dvc push`), as the ingest flow does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["dvc", "version_folder"]


def dvc(args: list[str], cwd: Path) -> str:
    """Run `dvc ARGS` in `cwd` (the venv's dvc when there is one); raise with its output on failure."""
    beside = Path(sys.executable).parent / "dvc"
    proc = subprocess.run(
        [str(beside) if beside.is_file() else "dvc", *args],
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


def version_folder(workdir: str | os.PathLike, path: str, remote: str | None = None) -> dict[str, Any]:
    """`dvc add PATH` then `dvc push`; the md5, size and file count DVC recorded.

    `dvc add` on an unchanged folder is a no-op and `dvc push` only sends missing objects, so a retry
    or a second run costs one hash check.
    """
    import yaml

    wd = Path(workdir).resolve()
    if not (wd / ".dvc").is_dir():
        raise RuntimeError(f"{wd} is not a DVC project: run `dvc init` and add a remote (or use the demo)")
    dvc(["add", path], wd)
    dvc_file = wd / f"{path}.dvc"
    dvc(["push", str(dvc_file.relative_to(wd)), *(["--remote", remote] if remote else [])], wd)
    out = (yaml.safe_load(dvc_file.read_text())["outs"] or [{}])[0]
    return {
        "path": path,
        "dvc_file": str(dvc_file),
        "md5": out.get("md5"),
        "size": out.get("size"),
        "nfiles": out.get("nfiles"),
        "remote": remote or "default",
    }
