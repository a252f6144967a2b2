"""Stage 2: train an uncertainty head (PFE, ProbFace, SCF) on a frozen backbone, on Ray Train.

The backbone comes from a model URI (`models:/facepipe-backbone@champion`) or a bundle/checkpoint path
and never trains. By default its outputs (embedding + final conv map) are computed once and cached as
shards (`facepipe.train.features.cache_features`), so the head trains without re-running the
backbone; with `cache_features: false` every batch is decoded and pushed through the backbone.

Batches: PFE and ProbFace need P classes × K images (their losses are over genuine pairs); SCF takes
plain batches and pulls each sample towards its class centre `w_c`, the margin head's weights saved
with the backbone. Plans are built per *window* of consecutive row groups: shards are label-sorted, so
a window holds whole classes and a batch is read from a bounded set of row groups (memory stays flat
as the dataset grows). The plan depends only on (seed, epoch, rank, world size, metadata), so a
resumed run continues at the exact batch.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.config import Config
from facepipe.errors import FacepipeError
from facepipe.fsutil import write_json_atomic

log = logging.getLogger(__name__)

HEAD_FILE = "head.pt"
HEAD_META = "head.json"
NEEDS_PK = {"pfe", "probface"}


# ---------------------------------------------------------------------------------------------
# The head as a module that maps backbone outputs to uncertainty
# ---------------------------------------------------------------------------------------------


def _uncertainty_module(method: str, head: Any) -> Any:
    from torch import nn

    from facepipe.uncertainty import get_method

    spec = get_method(method)

    class UncertaintyModel(nn.Module):
        """head(backbone outputs) -> log u; `uncertainty` gives u (σ² or κ)."""

        def __init__(self) -> None:
            super().__init__()
            self.method = spec.name
            self.head = head

        def forward(self, feature_map: Any) -> Any:
            return self.head(feature_map)

        def uncertainty(self, embedding: Any, feature_map: Any) -> Any:
            return spec.to_uncertainty(self.head(feature_map))

    return UncertaintyModel()


def build_head_model(
    method: str, map_shape: tuple[int, ...], embedding_size: int, extra: dict[str, Any]
) -> Any:
    """The method's head for a backbone whose conv map is `map_shape` = (C, H, W)."""
    from facepipe.uncertainty import build_uncertainty_head

    c, h, w = map_shape
    head = build_uncertainty_head(method, c, embedding_size, feature_hw=(h, w), **extra)
    return _uncertainty_module(method, head)


def save_head(directory: str | os.PathLike, model: Any, meta: dict[str, Any]) -> Path:
    import torch

    from facepipe.fsutil import atomic_path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    module = getattr(model, "module", model)
    with atomic_path(directory / HEAD_FILE) as tmp:
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, tmp)
    write_json_atomic(directory / HEAD_META, meta)
    return directory


def load_head(directory: str | os.PathLike, info: Any = None) -> Any:
    """An `UncertaintyModel` in eval mode from a directory written by `save_head`."""
    import torch

    directory = Path(directory)
    if not (directory / HEAD_META).is_file():
        found = sorted(p.parent for p in directory.rglob(HEAD_META))
        if not found:
            raise FacepipeError(f"no uncertainty head ({HEAD_META}) under {directory}")
        directory = found[0]
    meta = json.loads((directory / HEAD_META).read_text())
    model = build_head_model(meta["method"], tuple(meta["map_shape"]), meta["embedding_size"], meta["extra"])
    model.load_state_dict(torch.load(directory / HEAD_FILE, map_location="cpu", weights_only=True))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Batch plans over windows of row groups
# ---------------------------------------------------------------------------------------------


def unit_labels(units: list[Any]) -> list[np.ndarray]:
    """The label column of every row group (small: 8 bytes a row)."""
    import pyarrow.parquet as pq

    out = []
    handles: dict[str, Any] = {}
    for unit in units:
        handle = handles.setdefault(unit.path, pq.ParquetFile(unit.path))
        out.append(handle.read_row_group(unit.row_group, columns=["label"]).column("label").to_numpy())
    return out


def windows(units: list[Any], window_rows: int) -> list[list[int]]:
    """Consecutive unit indices grouped into windows of at least `window_rows` rows."""
    groups, current, rows = [], [], 0
    for i, unit in enumerate(units):
        current.append(i)
        rows += unit.rows
        if rows >= window_rows:
            groups.append(current)
            current, rows = [], 0
    if current:
        groups.append(current)
    return groups


def _window_batches(
    labels: list[np.ndarray],
    window: list[int],
    rng: np.random.Generator,
    pk: tuple[int, int] | None,
    batch_size: int,
) -> list[np.ndarray]:
    """Batches of (unit, row) pairs from one window: P×K by class, or plain shuffled batches."""
    unit_ids = np.concatenate([np.full(len(labels[u]), u) for u in window])
    rows = np.concatenate([np.arange(len(labels[u])) for u in window])
    lab = np.concatenate([labels[u] for u in window])
    pairs = np.stack([unit_ids, rows], axis=1)
    if pk is None:
        perm = rng.permutation(len(lab))
        return [pairs[perm[i : i + batch_size]] for i in range(0, len(perm) - batch_size + 1, batch_size)]
    p, k = pk
    chunks = []
    order = np.argsort(lab, kind="stable")
    bounds = np.flatnonzero(np.diff(lab[order])) + 1
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue  # a class with one image has no genuine pair
        members = rng.permutation(members)
        if len(members) < k:
            members = np.concatenate([members, rng.choice(members, k - len(members))])
        for i in range(0, len(members) - k + 1, k):
            chunks.append(members[i : i + k])
    chunk_order = rng.permutation(len(chunks))
    batches = []
    for i in range(0, len(chunk_order) - p + 1, p):
        batches.append(pairs[np.concatenate([chunks[c] for c in chunk_order[i : i + p]])])
    return batches


def epoch_plan(
    labels: list[np.ndarray],
    groups: list[list[int]],
    epoch: int,
    seed: int,
    rank: int,
    world: int,
    pk: tuple[int, int] | None,
    batch_size: int,
) -> list[np.ndarray]:
    """This rank's batches for `epoch`: windows dealt round-robin in a seeded order, equal counts."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(groups))
    per_rank: list[list[np.ndarray]] = [[] for _ in range(world)]
    for i, g in enumerate(order):
        wrng = np.random.default_rng([seed, epoch, int(g)])
        per_rank[i % world].extend(_window_batches(labels, groups[g], wrng, pk, batch_size))
    steps = min(len(b) for b in per_rank)
    mine = per_rank[rank][:steps]
    np.random.default_rng([seed, epoch, 10_000 + rank]).shuffle(mine)
    return mine


# ---------------------------------------------------------------------------------------------
# Reading batches: from the feature cache, or by running the backbone
# ---------------------------------------------------------------------------------------------


class CachedFeatures:
    """Rows of the feature cache by (unit, row), through an LRU of decoded row groups."""

    def __init__(self, units: list[Any], map_shape: tuple[int, ...], cache_groups: int = 8):
        self.units, self.map_shape, self.cache_groups = units, map_shape, cache_groups
        self._cache: collections.OrderedDict[int, dict[str, np.ndarray]] = collections.OrderedDict()

    def _group(self, u: int) -> dict[str, np.ndarray]:
        from facepipe.train.features import read_cached_rows

        if u in self._cache:
            self._cache.move_to_end(u)
            return self._cache[u]
        unit = self.units[u]
        value = read_cached_rows(unit.path, unit.row_group, self.map_shape)
        self._cache[u] = value
        while len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return value

    def batch(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(embeddings, feature maps float32, labels) of a batch."""
        emb, fmap, lab = [], [], []
        for u in np.unique(pairs[:, 0]):
            rows = pairs[pairs[:, 0] == u, 1]
            group = self._group(int(u))
            emb.append(group["embedding"][rows])
            fmap.append(group["feature_map"][rows].astype(np.float32))
            lab.append(group["label"][rows])
        return np.concatenate(emb), np.concatenate(fmap), np.concatenate(lab)


class RecomputedFeatures:
    """Rows decoded from the image shards and pushed through the frozen backbone (the no-cache path)."""

    def __init__(self, units: list[Any], backbone: Any, input_size: tuple[int, int], color_order: str):
        self.units, self.backbone = units, backbone
        self.input_size, self.color_order = input_size, color_order

    def batch(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from facepipe.data.loader import decode_rows
        from facepipe.train.features import embed_images

        pieces = []
        for u in np.unique(pairs[:, 0]):
            unit = self.units[int(u)]
            pieces.append((unit.path, unit.row_group, pairs[pairs[:, 0] == u, 1]))
        images, labels = decode_rows(pieces, np.zeros(len(pairs), bool), self.input_size, self.color_order)
        emb, _, fmap = embed_images(self.backbone, images, maps=True)
        return emb, fmap, labels


def backbone_fingerprint(bundle_dir: Path, shards_dir: str) -> str:
    """Identity of (backbone weights, training data): the key of the feature cache."""
    from facepipe.fsutil import sha256_file

    digest = hashlib.sha256()
    digest.update(sha256_file(bundle_dir / "backbone.pt").encode())
    manifest = Path(shards_dir) / "manifest.json"
    digest.update(sha256_file(manifest).encode() if manifest.is_file() else str(shards_dir).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The per-worker loop
# ---------------------------------------------------------------------------------------------


def head_loss(
    model: Any, method: Any, emb: np.ndarray, fmap: np.ndarray, labels: np.ndarray, class_weights: Any
) -> tuple[Any, dict[str, Any]]:
    """The method's loss for one batch of frozen backbone outputs (μ is the unit embedding)."""
    import torch
    import torch.nn.functional as F

    mu = F.normalize(torch.from_numpy(np.ascontiguousarray(emb)).float(), dim=1)
    out = model(torch.from_numpy(np.ascontiguousarray(fmap)))
    kwargs = {"class_weights": class_weights} if class_weights is not None else {}
    return method.loss(mu, out, torch.from_numpy(labels), **kwargs)


def head_worker(cfg: dict[str, Any]) -> None:
    import ray.train
    import torch

    from facepipe.data.loader import shard_units
    from facepipe.tracking import MetricLogger
    from facepipe.train.backbone import EventLog, build_optimizer, build_scheduler
    from facepipe.train.checkpoint import load_bundle, load_training_state, save_training_state
    from facepipe.train.nonfinite import stop_on_nonfinite
    from facepipe.train.ray_job import set_threads, worker_context
    from facepipe.uncertainty import get_method

    set_threads()
    config = Config.model_validate(cfg["config"])
    tu = config.train_uncertainty
    method = get_method(cfg["method"])
    rank, world, node = worker_context()
    events = EventLog(cfg.get("events_path"))
    torch.manual_seed(tu.seed)
    map_shape = tuple(cfg["map_shape"])
    centres = None
    if cfg["cache_dir"]:
        units = shard_units(cfg["cache_shards"])
        source: Any = CachedFeatures(units, map_shape)
        if method.name == "scf":
            _, _, centres = load_bundle(cfg["bundle"])
    else:
        backbone, info, centres = load_bundle(cfg["bundle"])
        for p in backbone.parameters():
            p.requires_grad_(False)
        units = shard_units(cfg["image_shards"])
        source = RecomputedFeatures(units, backbone, tuple(info.input_size), info.color_order)
    labels = unit_labels(units)
    total_rows = sum(u.rows for u in units)
    # windows of whole classes, but enough of them that every rank gets some
    groups = windows(units, min(cfg["window_rows"], max(total_rows // (2 * world), 1)))
    pk = (tu.classes_per_batch, tu.images_per_class) if method.name in NEEDS_PK else None
    steps_per_epoch = len(epoch_plan(labels, groups, 0, tu.seed, rank, world, pk, tu.batch_size))
    if steps_per_epoch == 0:
        raise FacepipeError("the data gives no batch per worker: lower classes_per_batch or batch_size")
    total_steps = tu.epochs * steps_per_epoch
    if tu.max_steps:
        total_steps = min(total_steps, tu.max_steps)

    model = build_head_model(method.name, map_shape, cfg["embedding_size"], tu.extra)
    model = ray.train.torch.prepare_model(model)
    inner = getattr(model, "module", model)
    optimizer = build_optimizer(model.parameters(), tu.optim)
    warmup = int(tu.optim.warmup_epochs * steps_per_epoch)
    scheduler = build_scheduler(optimizer, total_steps, warmup, tu.optim.poly_power)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state, meta = load_training_state(directory)
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(meta["step"])
    events.write(event="start", rank=rank, world=world, pid=os.getpid(), node=node, step=step)
    metrics_log = (
        MetricLogger(cfg.get("tracking_uri"), cfg.get("run_id")) if rank == 0 else MetricLogger(None, None)
    )
    class_weights = centres.float() if centres is not None else None

    def report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        metrics = {**metrics, "step": step, "epoch": step / steps_per_epoch}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_training_state(
                    tmp,
                    {
                        "model": inner.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                    },
                    {"step": step, "steps_per_epoch": steps_per_epoch},
                )
                save_head(Path(tmp) / "head", inner, cfg["head_meta"])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    model.train()
    last = float("nan")
    epoch_seconds = []
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        plan = epoch_plan(labels, groups, epoch, tu.seed, rank, world, pk, tu.batch_size)
        t0 = time.monotonic()
        for index in range(first, steps_per_epoch):
            loss, terms = head_loss(model, method, *source.batch(plan[index]), class_weights)
            where = f"epoch {epoch}, batch {index} (step {step + 1}, rank {rank})"
            if stop_on_nonfinite(loss, where, cfg, rank, step, events):
                metrics_log.flush()
                return  # every rank together; the driver raises the recorded error (no Ray retry)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tu.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            last = float(loss.detach())
            if rank == 0:
                events.write(event="step", step=step, loss=last)
                metrics_log.log(
                    {"train/loss": last, **{f"train/{k}": float(v) for k, v in terms.items()}}, step
                )
            if step >= total_steps:
                break
        epoch_seconds.append(time.monotonic() - t0)
        if rank == 0:
            metrics_log.log({"train/epoch_seconds": epoch_seconds[-1]}, step)
        if step < total_steps:
            report({"train/loss": last}, with_checkpoint=True)
    metrics_log.flush()
    report(
        {"train/loss": last, "epoch_seconds": float(np.mean(epoch_seconds)) if epoch_seconds else 0.0},
        with_checkpoint=True,
    )


# ---------------------------------------------------------------------------------------------
# Evaluation of a trained head on the pair tables
# ---------------------------------------------------------------------------------------------


def evaluate_head(
    backbone: Any,
    head: Any,
    method: str,
    shards_dir: str | os.PathLike,
    input_size: tuple[int, int],
    color_order: str,
    rejection_rates: list[float],
    raw_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Per pair table: uncertainty-aware 10-fold accuracy, risk-controlled accuracy, and, where the
    generator's `<set>.degradation.parquet` is in `raw_dir`, Spearman(uncertainty, degradation)."""
    import torch
    from scipy.stats import spearmanr

    from facepipe.eval.risk import risk_controlled_accuracy
    from facepipe.eval.verification import kfold_accuracy_scores
    from facepipe.train.features import decode_images_of, embed_images, pair_degradation, pair_tables
    from facepipe.uncertainty import get_method, score_pairs

    spec = get_method(method)
    metrics: dict[str, float] = {}
    accs = []
    head.eval()
    for name, path in pair_tables(shards_dir).items():
        import pyarrow.parquet as pq

        embs, uncs, scal, issame = [], [], [], []
        for batch in pq.ParquetFile(path).iter_batches(
            batch_size=128, columns=["image_a", "image_b", "issame"]
        ):
            imgs = [
                i
                for pair in zip(
                    batch.column("image_a").to_pylist(), batch.column("image_b").to_pylist(), strict=True
                )
                for i in pair
            ]
            emb, _, fmap = embed_images(
                backbone, decode_images_of(imgs, input_size, color_order, str(path), 0), maps=True
            )
            with torch.no_grad():
                u = head.uncertainty(None, torch.from_numpy(fmap))
            embs.append(emb)
            uncs.append(u.numpy())
            scal.append(spec.uncertainty_scalar(u).numpy())
            issame.append(batch.column("issame").to_numpy(zero_copy_only=False))
        emb = np.concatenate(embs)
        mu = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        u = np.concatenate(uncs)
        s = np.concatenate(scal)
        same = np.concatenate(issame).astype(bool)
        scores = score_pairs(method, mu[0::2], u[0::2], mu[1::2], u[1::2])
        acc = kfold_accuracy_scores(scores, same).accuracy
        metrics[f"val/{name}/accuracy"] = float(acc)
        accs.append(float(acc))
        cosine = np.sum(mu[0::2] * mu[1::2], axis=1)
        pair_unc = np.maximum(s[0::2], s[1::2])
        risk = risk_controlled_accuracy(cosine, same, pair_unc, rejection_rates)
        for r, a in zip(risk.rejection_rates, risk.accuracy, strict=True):
            metrics[f"val/{name}/risk_acc_reject_{int(round(r * 100))}"] = float(a)
        degradation = pair_degradation(raw_dir, name, len(same))
        if degradation is not None:
            rho = spearmanr(s, degradation.reshape(-1)).statistic
            metrics[f"val/{name}/spearman_degradation"] = float(rho)
    if accs:
        metrics["accuracy"] = float(np.mean(accs))
    return metrics


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


@dataclass
class FeatureSource:
    cache_dir: str | None
    cache_shards: list[str]
    map_shape: tuple[int, ...]
    embedding_size: int


def prepare_features(
    config: Config, bundle_dir: Path, shards: list[str], shards_dir: str, use_cache: bool
) -> FeatureSource:
    """Build (or reuse) the feature cache; always report the backbone's map shape."""
    from facepipe.train.checkpoint import load_bundle
    from facepipe.train.features import cache_features, cache_info, cached_shards, embed_images

    backbone, info, _ = load_bundle(bundle_dir)
    if not use_cache:
        probe = np.zeros((1, *info.input_size, 3), dtype=np.uint8)
        emb, _, fmap = embed_images(backbone, probe, maps=True)
        return FeatureSource(None, [], tuple(fmap.shape[1:]), int(emb.shape[1]))
    fingerprint = backbone_fingerprint(bundle_dir, shards_dir)
    out = Path(config.paths.features).resolve() / fingerprint[:16]  # workers run in another cwd
    cache_features(backbone, shards, out, tuple(info.input_size), info.color_order, fingerprint)
    meta = cache_info(out)
    return FeatureSource(
        str(out), [str(p) for p in cached_shards(out)], tuple(meta["map_shape"]), int(meta["embedding_size"])
    )


def train_uncertainty(
    config: Config,
    shards_dir: str | os.PathLike | None = None,
    method: str | None = None,
    backbone_uri: str | None = None,
    run_name: str | None = None,
    register: bool = True,
    events_path: str | os.PathLike | None = None,
    track: bool = True,
) -> Any:
    """Train an uncertainty head on a frozen backbone; returns a `StageResult` (see backbone.py)."""
    from facepipe import tracking
    from facepipe.train.backbone import StageResult, print_stage_summary, resolve_data
    from facepipe.train.checkpoint import load_bundle
    from facepipe.train.ray_job import launch_stage

    tu = config.train_uncertainty
    method = (method or tu.method).lower()
    if method not in ("pfe", "probface", "scf"):
        raise FacepipeError(f"unknown uncertainty method {method!r}: choose pfe, probface or scf")
    data = resolve_data(shards_dir or config.paths.shards)
    name = run_name or f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    bundle_dir = tracking.resolve_bundle(
        backbone_uri or tu.backbone_uri,
        config.tracking,
        Path(config.paths.runs).resolve() / name / "backbone",
    )
    _, info, centres = load_bundle(bundle_dir)
    if method == "scf" and centres is None:
        raise FacepipeError(f"SCF needs the class centres saved by the backbone stage; {bundle_dir} has none")
    features = prepare_features(config, bundle_dir, data.shards, data.shards_dir, tu.cache_features)
    run_id = tracking.start_run(config, method, data.shards_dir, "train_uncertainty", name) if track else None
    head_meta = {
        "method": method,
        "map_shape": list(features.map_shape),
        "embedding_size": features.embedding_size,
        "extra": tu.extra,
    }
    stage_config = {
        "method": method,
        "bundle": str(Path(bundle_dir).resolve()),
        "cache_dir": features.cache_dir,
        "cache_shards": features.cache_shards,
        "image_shards": data.shards,
        "map_shape": list(features.map_shape),
        "embedding_size": features.embedding_size,
        "head_meta": head_meta,
        "window_rows": 8192,
    }
    status = "FAILED"
    try:
        outcome = launch_stage(head_worker, config, tu.scaling, name, run_id, stage_config, events_path)
        head_dir = Path(outcome.checkpoint_path) / "head"
        backbone, info, _ = load_bundle(bundle_dir)
        metrics = evaluate_head(
            backbone,
            load_head(head_dir),
            method,
            data.shards_dir,
            tuple(info.input_size),
            info.color_order,
            config.eval.rejection_rates,
            config.paths.raw,
        )
        metrics["epoch_seconds"] = float(outcome.metrics.get("epoch_seconds", 0.0))
        result = StageResult(
            run_id,
            bundle_dir,
            metrics,
            seconds=outcome.seconds,
            extra={"head_dir": str(head_dir), "cache_dir": features.cache_dir},
        )
        if track:
            tracking.log_metrics(config.tracking, run_id, metrics, step=int(outcome.metrics.get("step", 0)))
            if register:
                u_size = features.embedding_size if method == "pfe" else 1
                result.model = tracking.log_and_register(
                    config.tracking,
                    run_id,
                    method,
                    bundle_dir,
                    metrics,
                    head_dir=head_dir,
                    uncertainty_size=u_size,
                )
        status = "FINISHED"
    finally:
        if track and run_id:
            tracking.end_run(config.tracking, run_id, status)
    print_stage_summary(
        f"facepipe train uncertainty ({method})", name, result, "head", head_dir, outcome.seconds
    )
    return result
