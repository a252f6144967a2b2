"""From a trained model to evaluation features: embeddings (+ mirror) and uncertainty of pair tables.

`load_eval_model` accepts a local folder holding a backbone bundle (and optionally an uncertainty
head, as a registered model's downloaded artifacts or a head-stage checkpoint do); the `evaluate`
command resolves model URIs (`models:/facepipe-probface@champion`) into such a folder first.
`pair_table_features` runs it over a pair table in batches and returns a
:class:`facepipe.eval.features.PairFeatures` in the verification layout (rows 2i / 2i+1 = pair
i's images), ready for :func:`facepipe.eval.pairs.table_report`:

* `embeddings` = f(x) and `flipped` = f(mirror x), un-normalised: the InsightFace protocol fuses
  them as f(x) + f(flip x) before normalising;
* `uncertainty`: the head's output for the unflipped image as the method stores it (its registry
  `uncertainty_kind`: σ² for PFE (per dimension) / ProbFace (scalar), 1/κ for SCF; larger = less
  reliable), with `kind` and `method` saying which;
* `degradation`: the pair table's `degradation_a/b` columns (synthetic data), NaN where null.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.data.dataset import PAIR_DEGRADATION_COLUMNS, Dataset
from facepipe.errors import DataError, FacepipeError
from facepipe.eval.embed_cache import EmbeddingCache, state_digest
from facepipe.eval.features import (
    PairFeatures,
    load_pair_features,
    read_pair_labels,
    read_provenance,
    save_pair_features,
)
from facepipe.eval.pairs import table_report
from facepipe.eval.report import write_metrics
from facepipe.fsutil import sha256_file
from facepipe.models.bundle import BundleInfo, find_bundle, load_bundle
from facepipe.models.embed import decode_images_of, embed_images
from facepipe.progress import progress

log = logging.getLogger(__name__)


@dataclass
class EvalModel:
    """A backbone in eval mode, its bundle info, and the uncertainty head when the model has one."""

    backbone: Any
    info: BundleInfo
    head: Any | None = None
    method: str | None = None
    source: str = ""

    @property
    def kind(self) -> str:
        """What `PairFeatures.uncertainty` will hold for this model (the method's registry kind)."""
        if self.method is None:
            return "sigma_sq"
        from facepipe.uncertainty.registry import get_method  # lazy: torch

        return get_method(self.method).uncertainty_kind

    @cached_property
    def backbone_digest(self) -> str:
        """The backbone's weights (sha256): the key of its outputs in an embedding cache."""
        return state_digest(self.backbone)

    @cached_property
    def fingerprint(self) -> str:
        """The whole model (backbone and head weights, method): what saved features were made with."""
        head = state_digest(self.head) if self.head is not None else ""
        return hashlib.sha256(f"{self.backbone_digest}|{self.method or ''}|{head}".encode()).hexdigest()


def load_eval_model(root: str | os.PathLike, source: str | None = None) -> EvalModel:
    """Load a local bundle folder (with its uncertainty head, when there is one).

    `source` is what the user named (a model URI the caller downloaded into `root`); default `root`.
    """
    from facepipe.uncertainty.head_io import find_heads, load_head  # lazy: torch

    root = Path(root)
    source = source or str(root)
    if not root.exists():
        raise FacepipeError(f"model {source} is not an existing folder")
    bundle = find_bundle(root)
    backbone, info, _ = load_bundle(bundle)
    # a registered model holds one head; a training-run folder may hold one per checkpoint: take the newest
    heads = find_heads(root)
    head, method = None, None
    if heads:
        if len(heads) > 1:
            log.warning("%d uncertainty heads under %s; using the newest, %s", len(heads), root, heads[-1])
        head = load_head(heads[-1])
        method = str(head.method)
    log.info("loaded %s: backbone %s%s", source, info.backbone, f" + {method} head" if method else "")
    return EvalModel(backbone, info, head, method, source)


def head_uncertainty(model: EvalModel, emb: np.ndarray, fmap: np.ndarray) -> np.ndarray:
    """The head's uncertainty of images (embeddings, conv maps) as its method stores it, (N, 1 or D)."""
    import torch

    from facepipe.uncertainty.registry import get_method

    with torch.no_grad():
        u = model.head.uncertainty(torch.from_numpy(emb), torch.from_numpy(fmap)).double().numpy()
    return get_method(model.method).to_stored(u.reshape(u.shape[0], -1))  # e.g. κ → 1/κ: larger = worse


def embed_batch(model: EvalModel, images_u8: np.ndarray, flip: bool = True) -> dict[str, np.ndarray]:
    """Embeddings, mirrored embeddings and (with a head) uncertainty of uint8 NHWC images."""
    emb, flipped, fmap = embed_images(model.backbone, images_u8, flip=flip, maps=model.head is not None)
    out = {"embeddings": emb}
    if flipped is not None:
        out["flipped"] = flipped
    if model.head is not None:
        out["uncertainty"] = head_uncertainty(model, emb, fmap)
    return out


def embed_table_images(
    model: EvalModel,
    batches: Iterable[np.ndarray],
    source: str | os.PathLike,
    color_order: str,
    flip: bool = True,
    batch_images: int = 256,
    cache: EmbeddingCache | None = None,
) -> dict[str, np.ndarray]:
    """Embeddings, mirrored embeddings and uncertainty of every image of the table `source`, which
    `batches` decodes (uint8 NHWC, `color_order`). With a `cache`, the backbone's outputs are read from it
    when there (then `batches` is never iterated) and stored otherwise; only the head runs on them."""
    if cache is None:
        return _concat(embed_batch(model, images, flip) for images in batches)
    settings = {
        "input_size": list(model.info.input_size),
        "color_order": color_order,
        "flip": flip,
        "batch_images": batch_images,
    }
    entry = cache.entry(model.backbone_digest, source, settings)
    arrays = cache.load(entry)
    if arrays is None:
        arrays = _concat(_backbone_outputs(model, images, flip) for images in batches)
        cache.save(entry, arrays)
    else:
        log.info("%s: backbone outputs from the embedding cache (%s)", Path(source).name, entry)
    out = {k: arrays[k] for k in ("embeddings", "flipped") if k in arrays}
    if model.head is not None:
        emb, maps, n = arrays["embeddings"], arrays["maps"], batch_images
        parts = [head_uncertainty(model, emb[s : s + n], maps[s : s + n]) for s in range(0, len(emb), n)]
        out["uncertainty"] = np.concatenate(parts)
    return out


def _backbone_outputs(model: EvalModel, images_u8: np.ndarray, flip: bool) -> dict[str, np.ndarray]:
    emb, flipped, fmap = embed_images(model.backbone, images_u8, flip=flip, maps=True)
    return {"embeddings": emb, "maps": fmap} | ({"flipped": flipped} if flipped is not None else {})


def _concat(parts: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    joined: dict[str, list[np.ndarray]] = {}
    for part in parts:
        for key, value in part.items():
            joined.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in joined.items()}


def pair_table_features(
    model: EvalModel,
    path: str | os.PathLike,
    color_order: str | None = None,
    batch_images: int = 256,
    flip: bool = True,
    show_progress: bool = True,
    cache: EmbeddingCache | None = None,
) -> PairFeatures:
    """Run `model` over every pair of a pair table, a batch at a time (memory: one batch of images, or
    with a `cache` the backbone's outputs of the whole table)."""
    import pyarrow.parquet as pq

    path = Path(path)
    issame, fold = read_pair_labels(path)
    try:
        handle = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"cannot read pair table: {err}", path=path) from err
    names = handle.schema_arrow.names
    missing = [c for c in ("image_a", "image_b") if c not in names]
    if missing:
        raise DataError(f"pair table lacks columns {missing}", path=path)
    rows = handle.metadata.num_rows
    if rows != issame.shape[0]:
        raise DataError(f"read {rows} image pairs but {issame.shape[0]} labels", path=path)
    if rows == 0:
        raise DataError("pair table is empty", path=path)
    batch_pairs = max(1, batch_images // 2)
    order = color_order or model.info.color_order
    batches = _pair_images(handle, path, batch_pairs, tuple(model.info.input_size), order)
    if show_progress:
        total = math.ceil(rows / batch_pairs)
        batches = progress(batches, total=total, desc=f"embed {path.stem}", unit="batch")
    arrays = embed_table_images(model, batches, path, order, flip, batch_images, cache)
    bad = np.flatnonzero(~np.isfinite(arrays["embeddings"]).all(axis=1))
    if bad.size:
        raise DataError("model gave a non-finite embedding", path=path, record=f"pair {int(bad[0]) // 2}")
    return PairFeatures(
        embeddings=arrays["embeddings"],
        issame=issame,
        flipped=arrays.get("flipped"),
        uncertainty=arrays.get("uncertainty"),
        degradation=_pair_degradation(path, [c for c in PAIR_DEGRADATION_COLUMNS if c in names]),
        fold=fold,
        kind=model.kind,
        method=model.method,
    )


def _pair_images(handle: Any, path: Path, batch_pairs: int, size: tuple, order: str) -> Iterator[np.ndarray]:
    """The table's images, decoded, a batch of pairs at a time: a0, b0, a1, b1, ... (the pair layout)."""
    row = 0
    for batch in handle.iter_batches(batch_size=batch_pairs, columns=["image_a", "image_b"]):
        a = batch.column("image_a").to_pylist()
        b = batch.column("image_b").to_pylist()
        interleaved = [img for pair in zip(a, b, strict=True) for img in pair]
        yield decode_images_of(interleaved, size, order, str(path), 2 * row)
        row += batch.num_rows


def _pair_degradation(path: Path, columns: list[str]) -> np.ndarray | None:
    """Each image's degradation in pair layout (a0, b0, a1, b1, ...), NaN where null; None without it."""
    import pyarrow.parquet as pq

    if len(columns) != 2:
        return None
    table = pq.read_table(path, columns=columns)
    cols = [table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in columns]
    deg = np.stack(cols, axis=1).reshape(-1)
    return None if np.isnan(deg).all() else deg


# ---------------------------------------------------------------------------------------------
# The whole report of a model on a dataset's pair tables
# ---------------------------------------------------------------------------------------------


def evaluate_model(
    model: EvalModel,
    shards_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    rejection_rates: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3),
    n_folds: int = 10,
    batch_images: int = 256,
    flip: bool = True,
    edc=None,  # facepipe.eval.edc_report.EdcSettings; None: the defaults
    cache: EmbeddingCache | None = None,
) -> tuple[dict[str, Any], list[Path]]:
    """Score `model` on every pair table of `shards_dir`; write the report into `out_dir`.

    The one evaluation of a model: `facepipe evaluate --model` and the training stages' end-of-stage
    evaluation both run it (with :func:`facepipe.eval.pairs.eval_options` of `eval.*`), and each table
    goes through :func:`facepipe.eval.pairs.table_report`. Returns (headline keyed by pair-table name,
    files written); the headline keys are those of :mod:`facepipe.eval.metrics`. Each table's features
    are kept as ``OUT/<table>/features.npz`` with what made them (:func:`saved_pair_features` reads them
    back, e.g. for `facepipe compare`); a `cache` holds the backbone's outputs (see `embed_cache`).
    """
    shards_dir, out = Path(shards_dir), Path(out_dir)
    dataset = Dataset.at(shards_dir)  # a decoded dataset, or a protocol folder of pair tables
    tables = dataset.pair_tables
    if not tables:
        raise DataError("no pair tables (pairs/*.parquet) to evaluate on", path=dataset.pairs_dir)
    order = model.info.color_order
    if dataset.has_manifest():
        data_order = dataset.color_order
        if data_order != order:
            log.warning(
                "model was trained on %s input, dataset manifest says %s: using %s", order, data_order, order
            )
    summary: dict[str, Any] = {}
    written: list[Path] = []
    for name, path in tables.items():
        features = pair_table_features(model, path, order, batch_images, flip, cache=cache)
        plots = out / "plots" / name
        try:
            metrics, summary[name], paths = table_report(
                features, plots, name, tuple(rejection_rates), n_folds, edc
            )
        except ValueError as err:
            raise DataError(f"cannot evaluate: {err}", path=path) from err
        metrics["model"] = model.source
        # the full metrics live beside, not inside, the plots folder (dvc tracks that as plots)
        (plots / "metrics.json").unlink(missing_ok=True)
        written.append(write_metrics(out / name, metrics))
        made_with = provenance(model, path, flip)
        written.append(save_pair_features(out / name / FEATURES_FILE, features, made_with))
        written.extend(p for p in paths if p.suffix == ".png")
    written.insert(0, write_metrics(out, summary))
    info = {
        "source": model.source,
        "fingerprint": model.fingerprint,  # backbone and head weights: what the features were made with
        "method": model.method,
        "backbone": model.info.backbone,
        "embedding_size": model.info.embedding_size,
        "input_size": list(model.info.input_size),
        "color_order": order,
        "uncertainty_kind": model.kind if model.head is not None else None,
        "shards": str(shards_dir),
        "rejection_rates": list(rejection_rates),
        "folds": n_folds,
        "flip": flip,
        "batch_images": batch_images,
    }
    written.insert(1, write_metrics(out, info, "model.json"))
    return summary, written


# ---------------------------------------------------------------------------------------------
# Saved features: what `facepipe compare` reuses instead of embedding again
# ---------------------------------------------------------------------------------------------

FEATURES_FILE = "features.npz"


def provenance(model: EvalModel, table: str | os.PathLike, flip: bool) -> dict[str, Any]:
    """What a table's features depend on: the model's weights, the table's bytes and flip (the other
    eval settings act on the features afterwards, so a reader recomputes those with its own)."""
    return {"model": model.fingerprint, "table": sha256_file(table), "flip": bool(flip)}


def saved_pair_features(
    report: str | os.PathLike, model: EvalModel, table: str | os.PathLike, flip: bool
) -> tuple[PairFeatures | None, str]:
    """The features an evaluation of `model` saved under `report` for the pair table `table`, when they
    were made by the same model weights from the same table bytes with the same flip; else (None, why)."""
    path = Path(report) / Path(table).stem / FEATURES_FILE
    if not path.is_file():
        return None, f"no {path}"
    saved = read_provenance(path)
    wanted = provenance(model, table, flip)
    differ = [k for k, v in wanted.items() if saved.get(k) != v]
    if differ:
        return None, f"{path} was made with another {' and '.join(differ)}"
    return load_pair_features(path, table), f"reused {path}"
