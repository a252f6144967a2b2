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

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.data.dataset import PAIR_DEGRADATION_COLUMNS, Dataset
from facepipe.errors import DataError, FacepipeError
from facepipe.eval.features import PairFeatures, read_pair_labels
from facepipe.eval.pairs import table_report
from facepipe.eval.report import write_metrics
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


def embed_batch(model: EvalModel, images_u8: np.ndarray, flip: bool = True) -> dict[str, np.ndarray]:
    """Embeddings, mirrored embeddings and (with a head) uncertainty of uint8 NHWC images."""
    import torch

    from facepipe.uncertainty.registry import get_method

    emb, flipped, fmap = embed_images(model.backbone, images_u8, flip=flip, maps=model.head is not None)
    out = {"embeddings": emb}
    if flipped is not None:
        out["flipped"] = flipped
    if model.head is not None:
        with torch.no_grad():
            u = model.head.uncertainty(torch.from_numpy(emb), torch.from_numpy(fmap)).double().numpy()
        u = u.reshape(u.shape[0], -1)
        out["uncertainty"] = get_method(model.method).to_stored(u)  # e.g. κ → 1/κ: larger = less reliable
    return out


def pair_table_features(
    model: EvalModel,
    path: str | os.PathLike,
    color_order: str | None = None,
    batch_images: int = 256,
    flip: bool = True,
    show_progress: bool = True,
) -> PairFeatures:
    """Run `model` over every pair of a pair table, a batch at a time (memory: one batch of images)."""
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
    deg_cols = [c for c in PAIR_DEGRADATION_COLUMNS if c in names]
    batch_pairs = max(1, batch_images // 2)
    size = tuple(model.info.input_size)
    order = color_order or model.info.color_order
    parts: dict[str, list[np.ndarray]] = {}
    degradation: list[np.ndarray] = []
    row = 0
    batches = handle.iter_batches(batch_size=batch_pairs, columns=["image_a", "image_b", *deg_cols])
    total = math.ceil(handle.metadata.num_rows / batch_pairs)
    for batch in (
        progress(batches, total=total, desc=f"embed {path.stem}", unit="batch") if show_progress else batches
    ):
        a = batch.column("image_a").to_pylist()
        b = batch.column("image_b").to_pylist()
        interleaved = [img for pair in zip(a, b, strict=True) for img in pair]
        images = decode_images_of(interleaved, size, order, str(path), 2 * row)
        for key, value in embed_batch(model, images, flip).items():
            parts.setdefault(key, []).append(value)
        if len(deg_cols) == 2:
            cols = [batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in deg_cols]
            degradation.append(np.stack(cols, axis=1).reshape(-1))  # a0, b0, a1, b1, ...
        row += batch.num_rows
    if row != issame.shape[0]:
        raise DataError(f"read {row} image pairs but {issame.shape[0]} labels", path=path)
    if row == 0:
        raise DataError("pair table is empty", path=path)
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    bad = np.flatnonzero(~np.isfinite(arrays["embeddings"]).all(axis=1))
    if bad.size:
        raise DataError("model gave a non-finite embedding", path=path, record=f"pair {int(bad[0]) // 2}")
    deg = np.concatenate(degradation) if degradation else None
    if deg is not None and np.isnan(deg).all():
        deg = None
    return PairFeatures(
        embeddings=arrays["embeddings"],
        issame=issame,
        flipped=arrays.get("flipped"),
        uncertainty=arrays.get("uncertainty"),
        degradation=deg,
        fold=fold,
        kind=model.kind,
        method=model.method,
    )


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
) -> tuple[dict[str, Any], list[Path]]:
    """Score `model` on every pair table of `shards_dir`; write the report into `out_dir`.

    The one evaluation of a model: `facepipe evaluate --model` and the training stages' end-of-stage
    evaluation both run it (with :func:`facepipe.eval.pairs.eval_options` of `eval.*`), and each table
    goes through :func:`facepipe.eval.pairs.table_report`. Returns (headline keyed by pair-table name,
    files written); the headline keys are those of :mod:`facepipe.eval.metrics`.
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
        features = pair_table_features(model, path, order, batch_images, flip)
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
        written.extend(p for p in paths if p.suffix == ".png")
    written.insert(0, write_metrics(out, summary))
    info = {
        "source": model.source,
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
    }
    written.insert(1, write_metrics(out, info, "model.json"))
    return summary, written
