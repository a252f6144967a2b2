"""How many CPU cores this process may really use: its affinity mask, capped by a cgroup CPU quota.

A container's CPU limit (Docker's `--cpus`, a Kubernetes pod's `limits.cpu`) is a CFS quota, not an
affinity mask: `os.cpu_count()` and `sched_getaffinity` still report every core of the node. Sizing
thread or process pools from them on a 64-core node with a 4-CPU limit starts 64 workers that the
kernel then throttles in turn, slower than 4. The quota is read from cgroup v2 (`cpu.max`, the
tightest along the process's cgroup and its ancestors) or v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["available_cores", "cgroup_cpu_limit"]


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text().strip())
        period = int((directory / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None  # -1: no quota


def _v2_limit(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" and int(period) > 0 else None
    except (OSError, ValueError):
        return None


def _tightest(limits: list[float | None]) -> float | None:
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def _along(mount: Path, cgroup_path: str) -> list[Path]:
    """`mount` joined with the process's cgroup path and each of its ancestors, deepest first.

    Inside a container's cgroup namespace the path is "/" and the mount is the container's own cgroup;
    a path that does not exist under the mount (a host path seen from inside) falls back to the mount.
    """
    parts = [p for p in cgroup_path.strip().split("/") if p]
    dirs = [mount.joinpath(*parts[:i]) for i in range(len(parts), 0, -1)]
    return [d for d in dirs if d.is_dir()] + [mount]


def cgroup_cpu_limit(
    root: str | os.PathLike = "/sys/fs/cgroup", proc: str | os.PathLike = "/proc/self/cgroup"
) -> float | None:
    """CPUs the process's cgroup quota allows (e.g. 2.5), or None when there is no quota or no cgroup."""
    root = Path(root)
    try:
        lines = Path(proc).read_text().splitlines()
    except OSError:
        return None
    limits: list[float | None] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2 (unified); hybrid hosts mount it apart
            for mount in (root, root / "unified"):
                if (mount / "cgroup.controllers").is_file():
                    limits += [_v2_limit(d) for d in _along(mount, path)]
                    break
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's own hierarchy
            for name in (controllers, "cpu", "cpu,cpuacct"):
                if (root / name).is_dir():
                    limits += [_v1_limit(d) for d in _along(root / name, path)]
                    break
    return _tightest(limits)


def available_cores() -> int:
    """Cores this process may use: the affinity mask, capped by the cgroup quota (rounded up), >= 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # platforms without affinity masks
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(cores, 1)
