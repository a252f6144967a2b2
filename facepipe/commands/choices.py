"""Argument choices read from the uncertainty-method registry only when they are needed.

`facepipe --help` and every command build their parsers at start-up; importing the registry there
would import torch for `facepipe decode` too. These sequences look the names up on first use (when
argparse checks a value or prints the choices).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


class _RegistryChoices(Sequence[str]):
    """`extra` names first, then names read from the registry by `_lookup`."""

    def __init__(self, *extra: str) -> None:
        self.extra = extra

    def _lookup(self) -> list[str]:
        raise NotImplementedError

    def _names(self) -> list[str]:
        return [*self.extra, *self._lookup()]

    def __getitem__(self, index):  # type: ignore[override]
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, value: object) -> bool:
        return value in self._names()


class MethodChoices(_RegistryChoices):
    """The registered uncertainty methods (`pfe`, `probface`, ...)."""

    def _lookup(self) -> list[str]:
        from facepipe.uncertainty.registry import method_names  # lazy: torch

        return method_names()


class KindChoices(_RegistryChoices):
    """The stored uncertainty kinds (`sigma_sq`, `inv_kappa`)."""

    def _lookup(self) -> list[str]:
        from facepipe.uncertainty.registry import KINDS  # lazy: torch

        return list(KINDS)
