"""requirements.lock: the one place that names every version facepipe's environments install.

Standard library only, so it runs before `.venv` exists (the Makefile calls it with the system Python).

    python3 tools/lockfile.py check           # fail when pyproject.toml's dependencies changed since
                                              # `make lock` ran
    python3 tools/lockfile.py stamp           # record pyproject.toml's dependency digest (make lock)
    python3 tools/lockfile.py only torch      # those packages' blocks (pin + hashes), e.g. torch first
    python3 tools/lockfile.py without torch   # the lock less a package (the GPU image brings its own torch)
    python3 tools/lockfile.py sync-versions   # rewrite the versions that infra files and prefect.yaml name
    python3 tools/lockfile.py check-versions  # fail when one of those disagrees with the lock

The digest covers what decides the resolution (requires-python, dependencies, optional dependencies and
build requirements), not the rest of pyproject.toml, so a ruff setting does not ask for a new lock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
PYPROJECT = REPO / "pyproject.toml"
DIGEST_PREFIX = "# pyproject-dependencies-sha256: "
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def canonical_name(name: str) -> str:
    """PEP 503 normalisation: `PyYAML`, `pyyaml` and `py_yaml` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """`2.13.0+cpu` -> `2.13.0`: images name the release, the lock names the local CPU build."""
    return version.split("+", 1)[0]


def dependency_digest(pyproject: Path = PYPROJECT) -> str:
    data = tomllib.loads(pyproject.read_text())
    project = data.get("project", {})
    decisive = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "build-system": data.get("build-system", {}).get("requires", []),
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: Path = LOCK) -> str | None:
    for line in lock.read_text().splitlines():
        if line.startswith(DIGEST_PREFIX):
            return line[len(DIGEST_PREFIX) :].strip()
    return None


@dataclass(frozen=True)
class Block:
    """One locked package: its `name==version` line with the hash and `# via` lines after it."""

    name: str
    version: str
    text: str


def read_blocks(lock: Path = LOCK) -> list[Block]:
    blocks: list[Block] = []
    current: list[str] = []
    for line in lock.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            current = [line]
            blocks.append(Block(canonical_name(match.group(1)), match.group(2), ""))
        elif current and line.startswith((" ", "\t")):
            current.append(line)
        else:
            current = []
            continue
        blocks[-1] = Block(blocks[-1].name, blocks[-1].version, "\n".join(current) + "\n")
    return blocks


def pinned_versions(lock: Path = LOCK) -> dict[str, str]:
    return {b.name: b.version for b in read_blocks(lock)}


def stale_message(pyproject: Path = PYPROJECT, lock: Path = LOCK) -> str | None:
    """Why the lock does not describe pyproject.toml, or None when it does."""
    if not lock.is_file():
        return f"{lock.name} is missing: run `make lock` to create it from {pyproject.name}"
    recorded = recorded_digest(lock)
    if recorded is None:
        return f"{lock.name} has no '{DIGEST_PREFIX.strip()}' line: run `make lock` to regenerate it"
    if recorded != dependency_digest(pyproject):
        return (
            f"{pyproject.name}'s dependencies changed since {lock.name} was made: run `make lock` "
            f"to update the lock (and commit both files)"
        )
    return None


def stamp(lock: Path = LOCK, pyproject: Path = PYPROJECT) -> None:
    lines = [ln for ln in lock.read_text().splitlines() if not ln.startswith(DIGEST_PREFIX)]
    # after pip-compile's header comment, so the lock still reads top to bottom
    at = next((i for i, ln in enumerate(lines) if not ln.startswith("#")), len(lines))
    lines.insert(at, DIGEST_PREFIX + dependency_digest(pyproject))
    lock.write_text("\n".join(lines) + "\n")


# Every place outside the lock that names a locked version: (file, pattern whose group 1 is the version,
# package). The images run what the lock pins, so a new lock rewrites them and a test checks they agree.
VERSION_MENTIONS: list[tuple[str, str, str]] = [
    ("prefect.yaml", r"^prefect-version: ([\w.]+)$", "prefect"),
    ("infra/compose/docker-compose.yml", r"prefecthq/prefect:([\w.]+)-python", "prefect"),
    ("infra/compose/docker-compose.yml", r"facepipe-mlflow:([\w.]+)", "mlflow"),
    ("infra/docker/mlflow.Dockerfile", r"ghcr\.io/mlflow/mlflow:v([\w.]+)", "mlflow"),
    ("infra/docker/Dockerfile", r"rayproject/ray:([\w.]+)-py", "ray"),
    ("infra/docker/Dockerfile", r"torch==([\w.]+)", "torch"),
    ("infra/kubernetes/raycluster.yaml", r'rayVersion: "([\w.]+)"', "ray"),
    ("infra/kubernetes/rayjob.yaml", r'rayVersion: "([\w.]+)"', "ray"),
    ("infra/ray/cluster.yaml", r"ray\.__version__ == '([\w.]+)'", "ray"),
    ("infra/ray/cluster.yaml", r"rayproject/ray:([\w.]+)-py", "ray"),
    ("infra/ray/cluster.yaml", r"\(Ray ([\w.]+),", "ray"),
    ("infra/ray/cluster.yaml", r"torch ([\w.]+),", "torch"),
    ("infra/README.md", r"rayproject/ray:([\w.]+)-py", "ray"),
    ("infra/README.md", r"torch==([\w.]+)", "torch"),
    ("infra/README.md", r"MLflow ([\d.]+\d)", "mlflow"),
    ("infra/README.md", r"\(Ray ([\d.]+\d)", "ray"),
    ("infra/README.md", r"Prefect ([\d.]+\d)", "prefect"),
    ("README.md", r"torch==([\w.]+)", "torch"),
]


def version_mismatches(repo: Path = REPO, lock: Path = LOCK) -> list[str]:
    """One line per mention that disagrees with the lock (or a rule that no longer finds its text)."""
    pins = pinned_versions(lock)
    problems = []
    for rel, pattern, package in VERSION_MENTIONS:
        want = public_version(pins[package])
        found = re.findall(pattern, (repo / rel).read_text(), flags=re.M)
        if not found:
            problems.append(f"{rel}: no mention of {package} matches {pattern!r} (update VERSION_MENTIONS)")
        problems += [f"{rel}: names {package} {got}, the lock pins {want}" for got in found if got != want]
    return problems


def sync_versions(repo: Path = REPO, lock: Path = LOCK) -> list[str]:
    """Rewrite every mention to the locked version; returns the files changed."""
    pins = pinned_versions(lock)
    changed = []
    for rel, pattern, package in VERSION_MENTIONS:
        path = repo / rel
        text = path.read_text()
        want = public_version(pins[package])
        new = re.sub(pattern, lambda m, w=want: m.group(0).replace(m.group(1), w, 1), text, flags=re.M)
        if new != text:
            path.write_text(new)
            changed.append(rel)
    return sorted(set(changed))


def _block_of(name: str, lock: Path) -> Block:
    for block in read_blocks(lock):
        if block.name == canonical_name(name):
            return block
    raise SystemExit(f"{lock.name} pins no package named {name!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lockfile.py", description=__doc__.splitlines()[0])
    actions = ["check", "stamp", "only", "without", "sync-versions", "check-versions"]
    parser.add_argument("action", choices=actions)
    parser.add_argument("packages", nargs="*")
    parser.add_argument("--lock", type=Path, default=LOCK)
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = parser.parse_args(argv)
    if args.action == "check":
        problem = stale_message(args.pyproject, args.lock)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
        return 0
    if args.action == "stamp":
        stamp(args.lock, args.pyproject)
        return 0
    if args.action in ("only", "without"):
        if not args.packages:
            parser.error(f"{args.action} needs package names")
        named = {_block_of(name, args.lock).name for name in args.packages}
        keep = (lambda b: b.name in named) if args.action == "only" else (lambda b: b.name not in named)
        sys.stdout.write("".join(b.text for b in read_blocks(args.lock) if keep(b)))
        return 0
    if args.action == "sync-versions":
        for rel in sync_versions(lock=args.lock):
            print(f"updated {rel}")
        return 0
    problems = version_mismatches(lock=args.lock)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
