"""Missing fixtures: a clear skip on a clone without ../shared, a failure under CI (CI=true)."""

from __future__ import annotations

import os

import pytest


def running_in_ci() -> bool:
    """CI sets CI=true; there a missing fixture is a failure, so parity is never skipped silently."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_fixture(reason: str) -> None:
    """Skip with the reason on a developer's clone without ../shared; fail under CI."""
    if running_in_ci():
        pytest.fail(f"{reason} (CI=true: fixtures must be present)", pytrace=False)
    pytest.skip(reason)
