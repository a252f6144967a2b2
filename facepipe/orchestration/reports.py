"""Where the benchmark flow writes a model version's report, and reading its metrics back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_metrics", "report_dir"]


def report_dir(reports: str, model: dict[str, Any]) -> str:
    """`<reports>/<model name>-v<version>`: one folder per benchmarked version."""
    return str(Path(reports) / f"{model['name']}-v{model['version']}")


def read_metrics(out_dir: Path) -> dict[str, Any]:
    """The metrics JSON files a benchmark wrote (one per pair table, or one in total), by file stem."""
    found = {}
    for path in sorted(out_dir.rglob("*.json")):
        try:
            found[str(path.relative_to(out_dir).with_suffix(""))] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return found
