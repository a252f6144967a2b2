"""Cores a process may use: the affinity mask capped by a cgroup CPU quota (v1, v2 and hybrid layouts).

The cgroup trees are files under tmp_path laid out as the kernel mounts them; the affinity test pins a
real child process to one core.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from facepipe.cores import available_cores, cgroup_cpu_limit


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _proc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


V1 = {"cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
V2 = {"cgroup.controllers": "cpu io memory\n"}

# (what /proc/self/cgroup says, the files under the cgroup mount, the CPUs the quota allows)
LAYOUTS = {
    "v2 quota in a container namespace": ("0::/\n", V2 | {"cpu.max": "250000 100000\n"}, 2.5),
    "v2 without a quota": ("0::/\n", V2 | {"cpu.max": "max 100000\n"}, None),
    "v2 tightest of the cgroup and its ancestors": (
        "0::/kubepods/pod1/ctr\n",
        V2
        | {
            "kubepods/cpu.max": "400000 100000\n",  # the pod: 4 CPUs
            "kubepods/pod1/cpu.max": "max 100000\n",  # the container sets none of its own
            "kubepods/pod1/ctr/cpu.max": "1500000 100000\n",  # looser than its parent
        },
        4.0,
    ),
    "v1 quota": (
        "4:memory:/x\n3:cpu,cpuacct:/\n0::/\n",
        V1 | {"cpu,cpuacct/cpu.cfs_quota_us": "300000\n"},
        3.0,
    ),
    "v1 without a quota": ("3:cpu,cpuacct:/\n", V1 | {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n"}, None),
    # a host-side path that does not exist inside the container's mount: the mount's own files count
    "v1 cpu hierarchy of its own, host path": (
        "2:cpuacct:/\n1:cpu:/docker/abc\n",
        {"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"},
        0.5,
    ),
    # this machine's layout: v1 controllers plus a unified mount that has no cpu.max
    "hybrid, no quota file": (
        "1:cpu:/\n0::/\n",
        {
            "unified/cgroup.controllers": "\n",
            "cpu/cpu.cfs_quota_us": "-1\n",
            "cpu/cpu.cfs_period_us": "100000\n",
        },
        None,
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_quota_of_each_cgroup_layout(tmp_path, layout):
    proc_text, files, cpus = LAYOUTS[layout]
    root = tmp_path / "cg"
    _write(root, files)
    assert cgroup_cpu_limit(root, _proc(tmp_path, proc_text)) == cpus


@pytest.mark.parametrize("text", ["garbage\n", "0::/\n", ""])
def test_unreadable_or_missing_files_mean_no_quota(tmp_path, text):
    root = tmp_path / "cg"
    _write(root, {"cgroup.controllers": "cpu\n", "cpu.max": "not numbers\n"})
    assert cgroup_cpu_limit(root, _proc(tmp_path, text)) is None
    assert cgroup_cpu_limit(root, tmp_path / "missing") is None


def test_available_cores_follows_the_affinity_mask():
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
    code += "from facepipe.cores import available_cores; print(available_cores())"
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    mask, limit = len(os.sched_getaffinity(0)), cgroup_cpu_limit()
    assert available_cores() == (mask if limit is None else max(min(mask, math.ceil(limit)), 1))
