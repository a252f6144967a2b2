"""requirements.lock: the environment is exactly the lock, the lock describes pyproject.toml, and every
file that names a version agrees with it."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.fixture_dirs import running_in_ci
from tools import lockfile

REPO = Path(__file__).resolve().parents[2]
LOCKTOOL = [sys.executable, str(REPO / "tools" / "lockfile.py")]


def _run_locktool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LOCKTOOL, *args], capture_output=True, text=True, timeout=60)


def test_every_locked_package_has_hashes():
    blocks = lockfile.read_blocks()
    assert len(blocks) > 100  # the whole environment, transitive packages included
    for block in blocks:
        assert "--hash=sha256:" in block.text, f"{block.name} is locked without a hash"
    names = [b.name for b in blocks]
    assert len(names) == len(set(names)), "a package is locked twice"


def test_installed_environment_is_exactly_the_lock():
    """pip freeze of the running environment vs the lock: nothing missing, extra or at another version."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        if running_in_ci():
            pytest.fail(f"CI must run the tests in {REPO / '.venv'}, not {sys.prefix}")
        pytest.skip(f"not running in the project's .venv ({sys.prefix})")
    installed = {lockfile.canonical_name(d.metadata["Name"]): d.version for d in distributions()}
    installed.pop("facepipe")  # the project itself, installed editable from this checkout
    locked = lockfile.pinned_versions()
    missing, extra = locked.keys() - installed.keys(), installed.keys() - locked.keys()
    assert not missing, f"locked but not installed: {sorted(missing)}"
    assert not extra, f"installed but not locked: {sorted(extra)}"
    differ = {n: (installed[n], locked[n]) for n in locked if Version(installed[n]) != Version(locked[n])}
    assert not differ, f"installed != locked: {differ}"


def test_lock_satisfies_every_range_in_pyproject():
    """People who install facepipe as a library get the ranges; the lock must sit inside them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    locked = lockfile.pinned_versions()
    for req in requirements:
        name = lockfile.canonical_name(req.name)
        assert name in locked, f"{req.name} is required by pyproject.toml but not locked: run `make lock`"
        assert req.specifier.contains(Version(locked[name]), prereleases=True), (
            f"{req.name}=={locked[name]} in the lock is outside pyproject.toml's {req.specifier}"
        )


def test_the_lock_is_current():
    assert _run_locktool("check").returncode == 0, lockfile.stale_message()


def test_bumping_a_pin_without_make_lock_fails_with_a_message(tmp_path):
    text = (REPO / "pyproject.toml").read_text()
    bumped = re.sub(r'"numpy>=([\d.]+)"', '"numpy>=99.0"', text, count=1)
    assert bumped != text
    (tmp_path / "pyproject.toml").write_text(bumped)
    result = _run_locktool("check", "--pyproject", str(tmp_path / "pyproject.toml"))
    assert result.returncode == 1
    assert "run `make lock`" in result.stderr and "pyproject.toml" in result.stderr
    # a change outside the dependencies (a lint setting) does not ask for a new lock
    (tmp_path / "pyproject.toml").write_text(text.replace("line-length = 110", "line-length = 100"))
    assert _run_locktool("check", "--pyproject", str(tmp_path / "pyproject.toml")).returncode == 0


def test_make_test_refuses_a_stale_lock(tmp_path):
    """The Makefile's own gate, run as `make` runs it, on a copy with one pin bumped."""
    for name in ("Makefile", "requirements.lock"):
        (tmp_path / name).write_text((REPO / name).read_text())
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "lockfile.py").write_text((REPO / "tools" / "lockfile.py").read_text())
    text = (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(text.replace('"scipy>=1.11"', '"scipy>=1.12"'))
    result = subprocess.run(["make", "-C", str(tmp_path), "lock-check"], capture_output=True, text=True)
    assert result.returncode != 0 and "run `make lock`" in result.stderr, result.stderr


def test_files_that_name_versions_agree_with_the_lock():
    assert lockfile.version_mismatches() == []


def test_version_check_catches_a_drifted_tag(tmp_path):
    """The check has teeth: one stale tag in a copy of the repository's files is reported."""
    for rel in {rel for rel, _, _ in lockfile.VERSION_MENTIONS}:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((REPO / rel).read_text())
    compose = tmp_path / "infra/compose/docker-compose.yml"
    prefect = lockfile.public_version(lockfile.pinned_versions()["prefect"])
    compose.write_text(compose.read_text().replace(f"prefect:{prefect}-", "prefect:0.0.1-"))
    problems = lockfile.version_mismatches(repo=tmp_path)
    assert problems == [f"infra/compose/docker-compose.yml: names prefect 0.0.1, the lock pins {prefect}"]
    assert lockfile.sync_versions(repo=tmp_path) == ["infra/compose/docker-compose.yml"]
    assert lockfile.version_mismatches(repo=tmp_path) == []


def test_torch_is_the_cpu_build_and_installs_first():
    torch_block = _run_locktool("only", "torch").stdout
    assert torch_block.startswith("torch==") and "+cpu" in torch_block.splitlines()[0]
    makefile = (REPO / "Makefile").read_text()
    assert makefile.index("only torch") < makefile.index("-r $(LOCK)")
