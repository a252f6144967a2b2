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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.data import synth_render as sr

log = logging.getLogger(__name__)

GENERATOR_VERSION = 6

# Random streams: the first element after the seed in every default_rng([...]) key.
_S_TRAIN_ID, _S_TRAIN_IMG, _S_VAL_ID, _S_RELATIVE, _S_PAIR, _S_SAMPLES = range(6)

# Degradation bands that describe pairs: "clean" < 0.3, "degraded" > 0.7 (as the training issue reads them).
CLEAN_MAX = 0.3
DEGRADED_MIN = 0.7
# Baselines the pairs must defeat (10-fold accuracy): learning has to be needed.
PIXEL_LIMIT = 0.70
HOG_LIMIT = 0.80


@dataclass(frozen=True)
class PairSetSpec:
    """One verification set: how hard its negatives are and how its pairs mix degradation levels.

    `mix` holds (weight, (lo_a, hi_a), (lo_b, hi_b)): the chance of a pair type and the uniform ranges its
    two images' degradation is drawn from.
    """

    name: str
    relative_groups: int  # parameter groups a hard negative re-draws
    hard_negative_fraction: float  # of the negative pairs
    mix: tuple[tuple[float, tuple[float, float], tuple[float, float]], ...]


SYNTH_VAL = PairSetSpec(
    "synth_val",
    relative_groups=5,
    # most negatives of a real verification protocol are strangers; synth_hard is the relatives test
    hard_negative_fraction=0.15,
    mix=(
        (0.40, (0.0, CLEAN_MAX), (0.0, CLEAN_MAX)),  # clean pairs
        (0.35, (0.0, CLEAN_MAX), (CLEAN_MAX, 1.0)),  # clean vs degraded
        (0.25, (CLEAN_MAX, 1.0), (CLEAN_MAX, 1.0)),  # both degraded
    ),
)
SYNTH_HARD = PairSetSpec(
    "synth_hard",
    relative_groups=2,
    hard_negative_fraction=0.7,
    mix=(
        (0.20, (0.0, CLEAN_MAX), (0.0, CLEAN_MAX)),
        (0.40, (0.0, CLEAN_MAX), (DEGRADED_MIN - 0.2, 1.0)),
        (0.40, (CLEAN_MAX, 1.0), (DEGRADED_MIN - 0.2, 1.0)),
    ),
)


@dataclass(frozen=True)
class SynthConfig:
    identities: int = 1000
    images_per_identity: int = 15
    pairs: int = 3000  # per verification set
    seed: int = 0
    size: int = 112
    # training identities that are relatives of the previous family: they teach fine differences
    relative_fraction: float = 0.75
    relative_groups: tuple[int, int] = (3, 5)  # groups re-drawn for a training relative (inclusive range)
    verification_identities: int = 0  # 0: pairs // 6
    pair_sets: tuple[PairSetSpec, ...] = field(default=(SYNTH_VAL, SYNTH_HARD))

    def __post_init__(self) -> None:
        if self.identities < 2:
            raise ValueError("need at least 2 identities")
        if self.images_per_identity < 1:
            raise ValueError("need at least 1 image per identity")
        if self.pairs < 20 or self.pairs % 2:
            raise ValueError("pairs must be an even number >= 20 (half positive, half negative)")
        if self.size < 32:
            raise ValueError("size must be at least 32 pixels")

    @property
    def num_verification_identities(self) -> int:
        return self.verification_identities or max(10, self.pairs // 6)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


# ----------------------------------------------------------------------------------- identities


def _is_relative(cfg: SynthConfig, index: int) -> bool:
    # the first draw of an identity's own stream decides whether it joins the previous family
    return index > 0 and _rng(cfg.seed, _S_TRAIN_ID, index).random() < cfg.relative_fraction


def training_identity(cfg: SynthConfig, index: int) -> sr.Identity:
    """Training identity `index` (its label). Families are runs of consecutive labels: a relative
    re-draws a few groups of its family's founder, the nearest earlier identity that is not a relative."""
    founder = index
    while _is_relative(cfg, founder):
        founder -= 1
    rng = _rng(cfg.seed, _S_TRAIN_ID, founder)
    rng.random()  # the family decision
    base = sr.sample_identity(rng)
    if founder == index:
        return base
    rng = _rng(cfg.seed, _S_TRAIN_ID, index)
    rng.random()
    lo, hi = cfg.relative_groups
    return sr.make_relative(base, rng, int(rng.integers(lo, hi + 1)), parent=founder)


def verification_identity(cfg: SynthConfig, index: int) -> sr.Identity:
    """Held-out identity: its own random stream, never a training label."""
    return sr.sample_identity(_rng(cfg.seed, _S_VAL_ID, index))


def verification_relative(cfg: SynthConfig, set_index: int, index: int) -> sr.Identity:
    spec = cfg.pair_sets[set_index]
    rng = _rng(cfg.seed, _S_RELATIVE, set_index, index)
    return sr.make_relative(verification_identity(cfg, index), rng, spec.relative_groups, parent=index)


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


@dataclass
class PairSet:
    name: str
    images: list[bytes]  # 2 per pair: a, b
    issame: list[bool]
    rows: list[dict[str, Any]]  # one per pair: degradation_a/b, identities, kind


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


# ----------------------------------------------------------------------------------- baselines


def decode_grey(images: Sequence[bytes]) -> np.ndarray:
    import cv2

    out = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE) for b in images]
    return np.stack(out)


def pixel_features(grey: np.ndarray) -> np.ndarray:
    """Flattened greyscale, each image's mean removed: the raw-pixel baseline's feature."""
    flat = grey.reshape(len(grey), -1).astype(np.float32)
    return flat - flat.mean(axis=1, keepdims=True)


def hog_features(grey: np.ndarray, cell: int = 8, bins: int = 9, chunk: int = 256) -> np.ndarray:
    """Dalal-Triggs HOG in numpy (OpenCV 5 dropped HOGDescriptor): centred [-1, 0, 1] gradients, unsigned
    orientation in `bins` bins with linear vote splitting, `cell`-pixel cells, 2x2-cell blocks at a
    one-cell stride, L2-Hys normalised (clip 0.2). Works through `chunk` images at a time."""
    return np.concatenate([_hog_chunk(grey[i : i + chunk], cell, bins) for i in range(0, len(grey), chunk)])


def _hog_chunk(grey: np.ndarray, cell: int, bins: int) -> np.ndarray:
    n, h, w = grey.shape
    ch, cw = h // cell, w // cell
    g = grey[:, : ch * cell, : cw * cell].astype(np.float32)
    gx = np.zeros_like(g)
    gy = np.zeros_like(g)
    gx[:, :, 1:-1] = g[:, :, 2:] - g[:, :, :-2]
    gy[:, 1:-1, :] = g[:, 2:, :] - g[:, :-2, :]
    mag = np.hypot(gx, gy)
    pos = (np.rad2deg(np.arctan2(gy, gx)) % 180.0) / (180.0 / bins) - 0.5  # bin centres at (i + 0.5) * width
    lo = np.floor(pos).astype(np.int64)
    frac = pos - lo
    # flat histogram index of each pixel's cell; the two votes go to bins lo and lo + 1 (wrapping)
    cell_of = (np.arange(ch * cell) // cell)[:, None] * cw + (np.arange(cw * cell) // cell)[None, :]
    base = (np.arange(n)[:, None, None] * (ch * cw) + cell_of[None]) * bins
    size = n * ch * cw * bins
    hist = np.bincount((base + lo % bins).ravel(), (mag * (1 - frac)).ravel(), minlength=size)
    hist += np.bincount((base + (lo + 1) % bins).ravel(), (mag * frac).ravel(), minlength=size)
    hist = hist.reshape(n, ch, cw, bins)
    blocks = np.concatenate(
        [hist[:, :-1, :-1], hist[:, 1:, :-1], hist[:, :-1, 1:], hist[:, 1:, 1:]], axis=-1
    )  # (n, ch-1, cw-1, 4*bins)
    blocks = blocks / np.sqrt(np.sum(blocks**2, axis=-1, keepdims=True) + 1e-6)
    blocks = np.minimum(blocks, 0.2)
    blocks = blocks / np.sqrt(np.sum(blocks**2, axis=-1, keepdims=True) + 1e-6)
    return blocks.reshape(n, -1)


def pair_cosine(features: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows 2i and 2i+1."""
    norm = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return np.sum(norm[0::2] * norm[1::2], axis=1)


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """Threshold (predict same when score > t) with the highest accuracy on these pairs, and that accuracy."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], issame[order].astype(np.int64)
    n = len(s)
    # threshold below element i: pairs 0..i-1 predicted different, i..n-1 predicted same
    neg_below = np.concatenate([[0], np.cumsum(1 - y)])
    pos_above = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    correct = neg_below + pos_above
    # only cut between distinct scores
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[1:] != s[:-1]
    correct = np.where(valid, correct, -1)
    i = int(np.argmax(correct))
    if i == 0:
        t = s[0] - 1e-6 if n else 0.0
    elif i == n:
        t = s[-1] + 1e-6
    else:
        t = (s[i - 1] + s[i]) / 2
    return float(t), float(correct[i] / max(n, 1))


def ten_fold_accuracy(scores: np.ndarray, issame: np.ndarray, folds: int = 10) -> float:
    """LFW-style: contiguous folds; the threshold is chosen on the other folds and tested on this one."""
    scores, issame = np.asarray(scores, dtype=np.float64), np.asarray(issame, dtype=bool)
    n = len(scores)
    bounds = np.linspace(0, n, folds + 1).astype(int)
    accs = []
    for k in range(folds):
        test = np.zeros(n, dtype=bool)
        test[bounds[k] : bounds[k + 1]] = True
        if not test.any():
            continue
        t, _ = best_threshold(scores[~test], issame[~test])
        accs.append(np.mean((scores[test] > t) == issame[test]))
    return float(np.mean(accs))


def baselines(pair_set: PairSet, chunk_pairs: int = 256) -> dict[str, float]:
    """Raw-pixel and HOG cosine 10-fold accuracy. HOG is scored both as is and centred on the set's mean
    descriptor; the better of the two is reported, so the limit holds for either reading.

    Images are decoded `chunk_pairs` pairs at a time; only the HOG descriptors (float32) are kept whole,
    because centring needs their mean."""
    issame = np.asarray(pair_set.issame)
    pix_scores, hogs = [], []
    for start in range(0, len(issame), chunk_pairs):
        grey = decode_grey(pair_set.images[2 * start : 2 * (start + chunk_pairs)])
        pix_scores.append(pair_cosine(pixel_features(grey)))
        hogs.append(hog_features(grey).astype(np.float32))
    pix = np.concatenate(pix_scores)
    hog = np.concatenate(hogs)
    hog_plain = ten_fold_accuracy(pair_cosine(hog), issame)
    hog_centred = ten_fold_accuracy(pair_cosine(hog - hog.mean(axis=0)), issame)
    rows = pair_set.rows
    clean = np.array([r["degradation_a"] < CLEAN_MAX and r["degradation_b"] < CLEAN_MAX for r in rows])
    result = {
        "pixel_cosine_acc": ten_fold_accuracy(pix, issame),
        "hog_cosine_acc": max(hog_plain, hog_centred),
        "hog_plain_acc": hog_plain,
        "hog_centred_acc": hog_centred,
    }
    if clean.sum() >= 20:
        # clean pairs only, one best threshold fitted on them (optimistic, no folds): an upper bound
        result["pixel_clean_best_acc"] = best_threshold(pix[clean], issame[clean])[1]
        result["hog_clean_best_acc"] = best_threshold(pair_cosine(hog[np.repeat(clean, 2)]), issame[clean])[1]
    return result


# ----------------------------------------------------------------------------------- writing


class _ParquetRows:
    """Append dict rows to a Parquet file in row groups of `batch` rows (memory stays flat); the file
    appears under its final name only when the writer closes without error."""

    def __init__(self, path: Path, schema: Any, batch: int = 8192) -> None:
        from facepipe.fsutil import atomic_path

        self.schema, self.batch = schema, batch
        self._pending: list[dict[str, Any]] = []
        self._atomic = atomic_path(path)
        self._writer: Any = None

    def __enter__(self) -> _ParquetRows:
        import pyarrow.parquet as pq

        tmp = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(tmp, self.schema)
        return self

    def add(self, row: dict[str, Any]) -> None:
        self._pending.append(row)
        if len(self._pending) >= self.batch:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._pending:
            self._writer.write_table(pa.Table.from_pylist(self._pending, schema=self.schema))
            self._pending = []

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                self._flush()
        finally:
            self._writer.close()
            self._atomic.__exit__(*exc)


def _write_parquet(path: Path, rows: list[dict[str, Any]], schema: Any) -> None:
    with _ParquetRows(path, schema) as out:
        for row in rows:
            out.add(row)


def _train_schema() -> Any:
    """key, label, degradation, then every other nuisance parameter (ints as int64, the rest float32)."""
    import pyarrow as pa

    ints = ("occlusions", "jpeg_quality", "seed")
    fields = [
        pa.field("key", pa.int64()),
        pa.field("label", pa.int64()),
        pa.field("degradation", pa.float32()),
    ]
    for name in sr.Nuisance.__dataclass_fields__:
        if name != "degradation":
            fields.append(pa.field(name, pa.int64() if name in ints else pa.float32()))
    return pa.schema(fields)


def _pair_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("pair", pa.int64()),
            ("issame", pa.bool_()),
            ("degradation_a", pa.float32()),
            ("degradation_b", pa.float32()),
            ("identity_a", pa.int64()),
            ("identity_b", pa.int64()),
            ("hard_negative", pa.bool_()),
            ("redrawn", pa.string()),  # groups the relative re-drew (hard negatives only)
            ("kind", pa.string()),  # clean / mixed / degraded: the pair type drawn
        ]
    )


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
    from facepipe.data.insightface import write_training_set
    from facepipe.data.verification_bin import write_bin
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
        "generator": "facepipe.data.synthetic",
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


# ----------------------------------------------------------------------------------- samples figure


def write_samples_png(
    path: Path, cfg: SynthConfig, rows: int = 6, cols: int = 7, relative_pairs: int = 4
) -> Path:
    """Rows: identities, columns: increasing degradation; last row: parent/relative pairs (clean)."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from facepipe.fsutil import atomic_path

    levels = np.linspace(0.0, 1.0, cols)
    fig, axes = plt.subplots(
        rows + 1, max(cols, 2 * relative_pairs), figsize=(1.5 * cols + 0.6, 1.6 * (rows + 1))
    )
    for ax in axes.ravel():
        ax.axis("off")
    for r in range(rows):
        label = r * max(1, cfg.identities // rows) % cfg.identities
        identity = training_identity(cfg, label)
        for c, d in enumerate(levels):
            nz = sr.sample_nuisance(_rng(cfg.seed, _S_SAMPLES, r, c), float(d))
            img = sr.degrade(sr.render_clean(identity, nz, cfg.size), nz)
            axes[r, c].imshow(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
            if r == 0:
                axes[r, c].set_title(f"degradation {d:.2f}", fontsize=8)
        axes[r, 0].text(-8, cfg.size / 2, f"id {label}", fontsize=8, ha="right", va="center")
    spec_index = 0
    for i in range(relative_pairs):
        parent = verification_identity(cfg, i)
        relative = verification_relative(cfg, spec_index, i)
        nz = sr.sample_nuisance(_rng(cfg.seed, _S_SAMPLES, 1000, i), 0.0)
        for j, ident in enumerate((parent, relative)):
            ax = axes[rows, 2 * i + j]
            ax.imshow(cv2.cvtColor(sr.render_clean(ident, nz, cfg.size), cv2.COLOR_BGR2RGB))
            title = f"val id {i}" if j == 0 else "relative: " + "\n".join(ident.redrawn)
            ax.set_title(title, fontsize=7)
    fig.suptitle(
        f"facepipe synth (seed {cfg.seed}): identities × degradation; bottom: hard negatives", fontsize=10
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


__all__ = [
    "SYNTH_HARD",
    "SYNTH_VAL",
    "PairSet",
    "PairSetSpec",
    "SynthConfig",
    "baselines",
    "best_threshold",
    "build_pair_set",
    "generate",
    "iter_training_classes",
    "render_identity_images",
    "render_pair",
    "ten_fold_accuracy",
    "training_identity",
    "verification_identity",
    "verification_relative",
    "write_samples_png",
]
