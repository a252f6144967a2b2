"""Shared fixtures: where the shared fixture folders are (skipped with a reason when absent, failed under CI).

Each folder comes from an environment variable, defaulting to ../shared/fixtures/... next to the
repository, so the same tests run on any folder of the same layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixture_dirs import missing_fixture

REPO = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


def _fixture_dir(env: str, default: Path) -> Path:
    path = Path(os.environ.get(env, default))
    if not path.is_dir():
        missing_fixture(f"fixture folder {path} is absent (set {env} to a folder of the same layout)")
    return path


@pytest.fixture(scope="session")
def recordio_dir() -> Path:
    return _fixture_dir("FACEPIPE_RECORDIO_FIXTURES", SHARED_FIXTURES / "recordio")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _fixture_dir("FACEPIPE_GOLDEN_DIR", SHARED_FIXTURES / "golden")


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    return _fixture_dir("FACEPIPE_FACES_DIR", SHARED_FIXTURES / "faces")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with slow tests run first: with `-n 2 --dist loadfile` (make test) a long file that
    started last would run alone at the end while the other worker idles."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order within each group kept
