"""A flow's settings: workdir, parameter file and overrides, and the typed config they give."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from facepipe.fsutil import absolute_tracking_uri

__all__ = ["FlowSettings", "absolute_tracking_uri", "scaling_overrides"]


class FlowSettings:
    """A flow's workdir, parameter file and overrides, and the typed config they give.

    Every stage command that reads params.yaml gets the same `--config FILE section.key=value ...`, so
    what the flow fingerprints is what the stage runs with.
    """

    def __init__(self, workdir: str, params: str, overrides: list[str] | None = None):
        from facepipe.config import load_config

        self.workdir = str(Path(workdir).resolve())
        path = Path(params)
        self.params = str(path if path.is_absolute() else Path(self.workdir) / path)
        self.overrides = list(overrides or [])
        config = load_config(self.params, self.overrides)
        # Ray Train workers run in Ray's own folder, where relative paths (and a relative
        # sqlite:///mlflow.db) would name other, empty places: pin them to the workdir
        for key, value in config.paths.model_dump().items():
            if "://" not in str(value) and not Path(value).is_absolute():
                self.overrides.append(f"paths.{key}={Path(self.workdir) / value}")
        uri = config.tracking.tracking_uri
        if absolute_tracking_uri(uri, self.workdir) != uri:
            self.overrides.append(f"tracking.tracking_uri={absolute_tracking_uri(uri, self.workdir)}")
        self.config = load_config(self.params, self.overrides)

    def with_overrides(self, extra: list[str]) -> FlowSettings:
        return FlowSettings(self.workdir, self.params, self.overrides + extra)

    def config_args(self) -> list[str]:
        """`--config FILE` then the overrides; the overrides are positional, so these go last."""
        return ["--config", self.params, *self.overrides]

    def section(self, name: str) -> Any:
        """A config section as plain data, minus where it runs (the Ray address changes no result)."""
        data = getattr(self.config, name).model_dump(mode="json")
        if isinstance(data.get("scaling"), dict):
            data["scaling"].pop("address", None)
        return data

    def ray_env(self, ray_address: str | None) -> dict[str, str]:
        """RAY_ADDRESS for stage commands, so every Ray helper process attaches to that cluster."""
        return {"RAY_ADDRESS": ray_address} if ray_address else {}

    @property
    def tracking(self) -> dict[str, str]:
        return {
            "tracking_uri": self.config.tracking.tracking_uri,
            "experiment": self.config.tracking.experiment,
        }


def scaling_overrides(
    section: str, ray_address: str | None, num_workers: int | None, use_gpu: bool | None
) -> list[str]:
    """`params.yaml` overrides for a training section's Ray scaling, from flow parameters."""
    out = []
    if ray_address:
        out.append(f"{section}.scaling.address={ray_address}")
    if num_workers is not None:
        out.append(f"{section}.scaling.num_workers={int(num_workers)}")
    if use_gpu is not None:
        out.append(f"{section}.scaling.use_gpu={'true' if use_gpu else 'false'}")
    return out
