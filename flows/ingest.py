"""`ingest` flow: version the raw dataset with DVC, then turn it into training shards.

An InsightFace-layout dataset (train.rec/.idx/property, *.bin) is decoded into `paths.shards`; an image
folder (one sub-folder per identity) is aligned into `paths.aligned`. With `synthesize`, the sample
dataset is generated into `paths.raw` first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from facepipe.orchestration.settings import FlowSettings
from flows.stages import dvc_version, publish_links, run_stage


def synth_argv(s: FlowSettings) -> list[str]:
    # every setting (the protocol sets the benchmark scores included) comes from the config
    return ["synth", s.config.paths.raw, *s.config_args()]


def decode_argv(s: FlowSettings) -> list[str]:
    return ["decode", s.config.paths.raw, s.config.paths.shards, *s.config_args()]


def align_argv(s: FlowSettings) -> list[str]:
    return ["align", s.config.paths.raw, s.config.paths.aligned, *s.config_args()]


def is_insightface_layout(raw: Path) -> bool:
    return (raw / "train.rec").is_file() or any(raw.glob("*.bin"))


@flow(name="ingest", retries=1, retry_delay_seconds=10, log_prints=True)
def ingest(
    workdir: str = ".",
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    synthesize: bool = False,
    version_data: bool = True,
    dvc_remote: str | None = None,
) -> dict[str, Any]:
    """Raw dataset → (DVC add + push) → decode (InsightFace layout) or align (image folders).

    Returns {data_version, train_data, stages}: the DVC md5 of the raw dataset, the shard folder the
    training stages read, and each stage's record.
    """
    s = FlowSettings(workdir, params, overrides)
    paths = s.config.paths
    stages = []
    if synthesize:
        stages.append(
            run_stage("synth", synth_argv(s), s.workdir, outs=[paths.raw], params=s.section("synth"))
        )
    raw = Path(s.workdir) / paths.raw
    if not raw.is_dir():
        raise FileNotFoundError(f"raw dataset {raw} not found (set paths.raw, or run with synthesize=True)")
    version = dvc_version(s.workdir, paths.raw, dvc_remote) if version_data else None
    if is_insightface_layout(raw):
        argv, out, section = decode_argv(s), paths.shards, "decode"
    else:
        argv, out, section = align_argv(s), paths.aligned, "align"
    stages.append(
        run_stage(section, argv, s.workdir, deps=[paths.raw], outs=[out], params=s.section(section))
    )
    publish_links(
        "ingest", "ingest: data version and stages", stages, {"DVC md5 of the raw dataset": version}
    )
    return {"data_version": version, "train_data": out, "stages": stages}
