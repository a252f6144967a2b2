"""A generated sample dataset in the exact InsightFace layout, so the pipeline runs with no download.

`generate(out_dir, SynthConfig(...))` writes
- `train.rec` / `train.idx` / `property` (RecBuilder layout, image keys 1..N in class order),
- verification sets `synth_val.bin` and `synth_hard.bin` (pairs of held-out identities: clean and degraded
  images, negatives partly relatives = an identity with some parameter groups re-drawn),
- sidecars: `degradation.parquet` (one row per training key: label, degradation and every nuisance
  parameter) and `<set>.degradation.parquet` (one row per pair),
- `synth_manifest.json` (config, counts, raw-pixel and HOG baselines) and `samples.png`.

Seeding: every identity, image and pair has its own `numpy.random.default_rng([seed, stream, index...])`,
so output does not depend on the number of worker processes and the same seed gives the same bytes.

Difficulty: identities differ in geometry and colouring, images in pose, misalignment, scene, lighting
and damage; 15% of the negative pairs of `synth_val` (70% of `synth_hard`, the stress set) are
relatives. The raw-pixel and HOG baselines land well under their limits (0.70 / 0.80); training
identities come in families (`relative_fraction`) so that a network learns the fine differences that
separate relatives.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.data.synth import render as sr
from facepipe.data.synth.baselines import (
    baselines,
)
from facepipe.data.synth.samples import (
    write_samples_png,
)
from facepipe.data.synth.spec import (
    _S_PAIR,
    _S_TRAIN_IMG,
    CLEAN_MAX,
    DEGRADED_MIN,
    GENERATOR_VERSION,
    HOG_LIMIT,
    PIXEL_LIMIT,
    SYNTH_HARD,
    SYNTH_VAL,
    PairSet,
    PairSetSpec,
    SynthConfig,
    _is_relative,
    _rng,
    training_identity,
    verification_identity,
    verification_relative,
)
from facepipe.data.synth.tables import (
    _pair_schema,
    _ParquetRows,
    _train_schema,
    _write_parquet,
)

log = logging.getLogger(__name__)

__all__ = [
    "CLEAN_MAX",
    "DEGRADED_MIN",
    "GENERATOR_VERSION",
    "PairSet",
    "PairSetSpec",
    "SYNTH_HARD",
    "SYNTH_VAL",
    "SynthConfig",
    "training_identity",
    "verification_identity",
    "verification_relative",
    "write_samples_png",
    "baselines",
    "render_identity_images",
    "iter_training_classes",
    "render_pair",
    "build_pair_set",
    "generate",
    "_load_state",
]


# ----------------------------------------------------------------------------------- training images


def render_identity_images(cfg: SynthConfig, label: int) -> list[tuple[bytes, dict[str, Any]]]:
    """All images of one training identity: (JPEG bytes, nuisance row) each.

    Degradation is U(0, 1)^2 (mean 1/3): every level occurs, clean images more often (55% below 0.3), so
    that identity is learnable in a short CPU run and the uncertainty heads still see the whole range."""
    identity = training_identity(cfg, label)
    rng = _rng(cfg.seed, _S_TRAIN_IMG, label)
    out = []
    for _ in range(cfg.images_per_identity):
        nz = sr.sample_nuisance(rng, float(rng.uniform(0.0, 1.0) ** 2))
        out.append((sr.render(identity, nz, cfg.size), nz.to_row()))
    return out


def _identity_task(args: tuple[SynthConfig, int]) -> tuple[int, list[tuple[bytes, dict[str, Any]]]]:
    cfg, label = args
    return label, render_identity_images(cfg, label)


def _pool(workers: int):
    # spawn: the parent may have threads (Ray, torch) that fork would copy in a broken state
    return multiprocessing.get_context("spawn").Pool(workers)


def iter_training_classes(
    cfg: SynthConfig, workers: int = 1, labels: Sequence[int] | None = None
) -> Iterator[tuple[int, list[tuple[bytes, dict[str, Any]]]]]:
    """(label, images) in label order, rendered by `workers` processes (results do not depend on it)."""
    labels = range(cfg.identities) if labels is None else labels
    tasks = ((cfg, label) for label in labels)
    if workers <= 1:
        yield from map(_identity_task, tasks)
        return
    with _pool(workers) as pool:
        yield from pool.imap(_identity_task, tasks, chunksize=4)


# ----------------------------------------------------------------------------------- verification pairs


def render_pair(cfg: SynthConfig, set_index: int, pair: int) -> tuple[bytes, bytes, dict[str, Any]]:
    """Pair `pair` of set `set_index`: even pairs are positive, odd ones negative (balanced folds)."""
    spec = cfg.pair_sets[set_index]
    rng = _rng(cfg.seed, _S_PAIR, set_index, pair)
    n_ids = cfg.num_verification_identities
    weights = np.array([m[0] for m in spec.mix])
    kind = int(rng.choice(len(spec.mix), p=weights / weights.sum()))
    _, range_a, range_b = spec.mix[kind]
    da, db = float(rng.uniform(*range_a)), float(rng.uniform(*range_b))
    if rng.random() < 0.5:
        da, db = db, da  # the degraded image is not always the second one
    issame = pair % 2 == 0
    id_a = int(rng.integers(n_ids))
    ident_a = verification_identity(cfg, id_a)
    hard = False
    if issame:
        id_b, ident_b = id_a, ident_a
    elif rng.random() < spec.hard_negative_fraction:
        hard = True
        id_b, ident_b = id_a, verification_relative(cfg, set_index, id_a)
    else:
        id_b = int((id_a + 1 + rng.integers(n_ids - 1)) % n_ids)
        ident_b = verification_identity(cfg, id_b)
    nz_a, nz_b = sr.sample_nuisance(rng, da), sr.sample_nuisance(rng, db)
    img_a, img_b = sr.render(ident_a, nz_a, cfg.size), sr.render(ident_b, nz_b, cfg.size)
    row = {
        "pair": pair,
        "issame": issame,
        "degradation_a": da,
        "degradation_b": db,
        "identity_a": id_a,
        "identity_b": id_b,
        "hard_negative": hard,
        "redrawn": ",".join(ident_b.redrawn) if hard else "",
        "kind": ("clean", "mixed", "degraded")[kind] if len(spec.mix) == 3 else str(kind),
    }
    return img_a, img_b, row


def _pair_task(args: tuple[SynthConfig, int, int]) -> tuple[bytes, bytes, dict[str, Any]]:
    return render_pair(*args)


def build_pair_set(
    cfg: SynthConfig, set_index: int, workers: int = 1, show_progress: bool = False
) -> PairSet:
    from facepipe.progress import progress

    spec = cfg.pair_sets[set_index]
    tasks = [(cfg, set_index, i) for i in range(cfg.pairs)]
    images: list[bytes] = []
    issame: list[bool] = []
    rows: list[dict[str, Any]] = []

    def consume(results: Iterator[tuple[bytes, bytes, dict[str, Any]]]) -> None:
        if show_progress:
            results = progress(results, total=len(tasks), desc=f"render {spec.name}", unit="pairs")
        for img_a, img_b, row in results:
            images.extend((img_a, img_b))
            issame.append(bool(row["issame"]))
            rows.append(row)

    if workers <= 1:
        consume(map(_pair_task, tasks))
    else:
        with _pool(workers) as pool:
            consume(pool.imap(_pair_task, tasks, chunksize=16))
    return PairSet(spec.name, images, issame, rows)


_STATE = ".synth_state.json"  # stages finished so far, for this config: an interrupted run resumes after them


def _load_state(out: Path, cfg: SynthConfig) -> dict[str, Any]:
    import json

    key = {"version": GENERATOR_VERSION, "config": json.loads(json.dumps(cfg.to_dict()))}
    try:
        state = json.loads((out / _STATE).read_text())
    except (FileNotFoundError, ValueError):
        state = {}
    if {k: state.get(k) for k in key} != key:
        state = {**key, "stages": {}}
    # a stage counts as done only while all of its files are still there
    state["stages"] = {
        name: info
        for name, info in state["stages"].items()
        if all((out / f).is_file() for f in info["files"])
    }
    return state


def _public(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k != "files"}


def generate(
    out_dir: str | os.PathLike, cfg: SynthConfig, workers: int = 1, force: bool = False
) -> dict[str, Any]:
    """Write the whole sample dataset into `out_dir`; returns the manifest (also written as JSON).

    Stages (training set, each verification set) are recorded as they finish: run again with the same
    config, an interrupted generation resumes after the last finished stage and a finished one returns at
    once. `force` starts from scratch. Every file is written under a temporary name and renamed when done.
    """
    from facepipe.data.formats.insightface import write_training_set
    from facepipe.data.formats.verification_bin import write_bin
    from facepipe.fsutil import clean_stale_temps, sha256_file, write_json_atomic
    from facepipe.progress import progress

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    start = time.monotonic()
    state = _load_state(out, cfg)
    if force:
        state["stages"] = {}
    stages = state["stages"]
    manifest_path = out / "synth_manifest.json"
    names = ["train", *(spec.name for spec in cfg.pair_sets)]
    if all(n in stages for n in names) and manifest_path.is_file() and (out / "samples.png").is_file():
        log.info("%s is up to date (same config, seed and generator version): nothing to do", out)
        import json

        return json.loads(manifest_path.read_text())
    manifest_path.unlink(missing_ok=True)  # no manifest = not a finished dataset

    def finish(name: str, info: dict[str, Any], files: list[str]) -> None:
        stages[name] = {**info, "files": files}
        write_json_atomic(out / _STATE, state)

    if "train" not in stages:
        # training set, streamed class by class into the writer; sidecar rows streamed beside it
        next_key = 1
        degradation_sum = 0.0

        def classes(sidecar: _ParquetRows) -> Iterator[list[bytes]]:
            nonlocal next_key, degradation_sum
            stream = iter_training_classes(cfg, workers)
            for label, images in progress(stream, total=cfg.identities, desc="render train", unit="ids"):
                for _, nuisance in images:
                    sidecar.add({"key": next_key, "label": label, **nuisance})
                    degradation_sum += nuisance["degradation"]
                    next_key += 1
                yield [jpeg for jpeg, _ in images]

        with _ParquetRows(out / "degradation.parquet", _train_schema()) as sidecar:
            written = write_training_set(
                out, classes(sidecar), image_size=(cfg.size, cfg.size), prefix="train"
            )
        train_info = {
            "classes": written["num_classes"],
            "images": written["num_images"],
            "relatives": sum(_is_relative(cfg, i) for i in range(cfg.identities)),
            "degradation_mean": degradation_sum / max(1, written["num_images"]),
            "sha256_rec": sha256_file(out / "train.rec"),
        }
        finish("train", train_info, ["train.rec", "train.idx", "property", "degradation.parquet"])
    else:
        log.info("training set already written by an earlier run with this config: kept")

    for set_index, spec in enumerate(cfg.pair_sets):
        if spec.name in stages:
            log.info("%s already written by an earlier run with this config: kept", spec.name)
            continue
        pair_set = build_pair_set(cfg, set_index, workers, show_progress=True)
        write_bin(out / f"{spec.name}.bin", pair_set.images, pair_set.issame)
        _write_parquet(out / f"{spec.name}.degradation.parquet", pair_set.rows, _pair_schema())
        base = baselines(pair_set)
        da = np.array([r["degradation_a"] for r in pair_set.rows])
        db = np.array([r["degradation_b"] for r in pair_set.rows])
        info = {
            "pairs": len(pair_set.issame),
            "positive": int(sum(pair_set.issame)),
            "hard_negatives": int(sum(r["hard_negative"] for r in pair_set.rows)),
            "clean_pairs": int(np.sum((da < CLEAN_MAX) & (db < CLEAN_MAX))),
            "degraded_pairs": int(np.sum((da > DEGRADED_MIN) | (db > DEGRADED_MIN))),
            "relative_groups": spec.relative_groups,
            "baselines": base,
            "sha256": sha256_file(out / f"{spec.name}.bin"),
        }
        log.info("%s: pixel %.3f, HOG %.3f", spec.name, base["pixel_cosine_acc"], base["hog_cosine_acc"])
        if base["pixel_cosine_acc"] > PIXEL_LIMIT or base["hog_cosine_acc"] > HOG_LIMIT:
            # small sets are noisy; a large one over the limit means the generator got too easy
            log.warning(
                "%s: baselines above the limits (pixel %.3f > %.2f or HOG %.3f > %.2f)",
                spec.name, base["pixel_cosine_acc"], PIXEL_LIMIT, base["hog_cosine_acc"], HOG_LIMIT,
            )  # fmt: skip
        finish(spec.name, info, [f"{spec.name}.bin", f"{spec.name}.degradation.parquet"])

    sets = {spec.name: _public(stages[spec.name]) for spec in cfg.pair_sets}
    samples_png = write_samples_png(out / "samples.png", cfg)
    manifest = {
        "generator": "facepipe.data.synth.generate",
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        # ordinary JPEGs (cv2 encoded them from BGR arrays), like InsightFace's: cv2.imdecode gives BGR,
        # mxnet/PIL give RGB; readers choose their order as for any InsightFace dataset
        "jpeg_colour": "standard",
        "image_size": [cfg.size, cfg.size],
        "train": _public(stages["train"]),
        "verification": sets,
        "limits": {"pixel_cosine_acc_max": PIXEL_LIMIT, "hog_cosine_acc_max": HOG_LIMIT},
        "within_limits": all(
            v["baselines"]["pixel_cosine_acc"] <= PIXEL_LIMIT
            and v["baselines"]["hog_cosine_acc"] <= HOG_LIMIT
            for v in sets.values()
        ),
        "files": sorted(
            {f for info in stages.values() for f in info["files"]} | {samples_png.name, "synth_manifest.json"}
        ),
        "samples_png": samples_png.name,
        "seconds": round(time.monotonic() - start, 1),
    }
    write_json_atomic(out / "synth_manifest.json", manifest)
    return manifest
