"""Features files: precomputed per-image embeddings for evaluation, and the pair tables they go with.

Format (NPZ, ``np.savez``; all arrays in the row order of the pair table's images, i.e. rows
``2i`` and ``2i+1`` are ``image_a`` and ``image_b`` of pair ``i``):

===============  ==========================  ==================================================
key              shape / dtype               meaning
===============  ==========================  ==================================================
``embeddings``   (2P, D) float               backbone output f(x), un-normalised (norm kept)
``flipped``      (2P, D) float, optional     f(horizontally flipped x): fused as f(x)+f(flip x)
``uncertainty``  (2P,) or (2P, 1|D) float    σ² (PFE per-dim / ProbFace scalar) or 1/κ (SCF);
                 optional                    larger = less reliable
``degradation``  (2P,) float in [0,1], opt.  how degraded each image is (synthetic sample data)
``issame``       (P,) bool, optional         pair labels when no pair table is given
``kind``         () str, optional            what ``uncertainty`` holds: ``sigma_sq`` | ``inv_kappa``
``method``       () str, optional            the uncertainty method that produced it (``pfe``, ...)
``fold``         (P,) int, optional          the pairs' folds, read with ``issame`` (no pair table)
===============  ==========================  ==================================================

``facepipe evaluate --model`` keeps each table's features in this format (:func:`save_pair_features`),
with ``provenance_*`` entries saying what made them (model weights, table bytes, flip).

The kinds and methods are those of :mod:`facepipe.uncertainty.registry`; without ``method`` the
uncertainty-aware score is that of the registered method storing this kind and width.
The same columns in a Parquet file (one row per image: ``embedding`` list<float>, optional
``flipped`` list<float>, ``uncertainty`` float or list<float>, ``degradation`` float) are read too.

Pair tables are the Parquet files of :func:`facepipe.data.shards.write_pair_table`
(``image_a``, ``image_b`` bytes, ``issame`` bool, ``fold`` int32); only ``issame`` and ``fold`` are
read here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facepipe.errors import DataError


@dataclass
class PairFeatures:
    embeddings: np.ndarray
    issame: np.ndarray
    flipped: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    degradation: np.ndarray | None = None
    fold: np.ndarray | None = None
    kind: str = "sigma_sq"  # a kind of facepipe.uncertainty.registry.KINDS
    method: str | None = None  # the uncertainty method, when known (else inferred from kind and width)

    @property
    def n_pairs(self) -> int:
        return int(self.issame.shape[0])


def save_features(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Write a features NPZ atomically (keys as in the module docstring)."""
    from facepipe.fsutil import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return path


PROVENANCE = "provenance_"


def save_pair_features(
    path: str | os.PathLike, features: PairFeatures, provenance: dict[str, str | bool | int] | None = None
) -> Path:
    """Write `features` (labels, folds, kind and method included) as a features NPZ, atomically, with
    `provenance` (plain values) stored beside the arrays."""
    arrays = {
        k: v
        for k in ("embeddings", "flipped", "uncertainty", "degradation", "issame", "fold")
        if (v := getattr(features, k)) is not None
    }
    arrays["kind"] = np.array(features.kind)
    if features.method is not None:
        arrays["method"] = np.array(features.method)
    for key, value in (provenance or {}).items():
        arrays[PROVENANCE + key] = np.array(value)
    return save_features(path, **arrays)


def read_provenance(path: str | os.PathLike) -> dict[str, str | bool | int]:
    """The provenance a features NPZ was saved with ({} when none, or the file is unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k[len(PROVENANCE) :]: z[k].item() for k in z.files if k.startswith(PROVENANCE)}
    except (OSError, ValueError):
        return {}


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read features file: {err}", path=path) from err


def _load_parquet(path: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"cannot read features file: {err}", path=path) from err
    out: dict[str, np.ndarray] = {}
    rename = {"embedding": "embeddings"}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        key = rename.get(name, name)
        if hasattr(col.type, "value_type"):  # list<float> per row -> (N, D)
            values = col.flatten().to_numpy(zero_copy_only=False)
            lengths = col.value_lengths().to_numpy(zero_copy_only=False)
            if lengths.size and not np.all(lengths == lengths[0]):
                row = int(np.flatnonzero(lengths != lengths[0])[0])
                raise DataError(f"column {name!r} has rows of different lengths", path=path, record=row)
            out[key] = values.reshape(len(col), -1)
        else:
            out[key] = col.to_numpy(zero_copy_only=False)
    return out


def read_pair_labels(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(issame, fold) of a pair table, read without touching the image columns."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        schema = pq.read_schema(path)
        cols = [c for c in ("issame", "fold") if c in schema.names]
        if "issame" not in cols:
            raise DataError("pair table has no 'issame' column", path=path)
        table = pq.read_table(path, columns=cols)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"cannot read pair table: {err}", path=path) from err
    issame = table.column("issame").to_numpy(zero_copy_only=False).astype(bool)
    fold = table.column("fold").to_numpy(zero_copy_only=False) if "fold" in cols else None
    return issame, fold


def load_pair_features(features: str | os.PathLike, pairs: str | os.PathLike | None = None) -> PairFeatures:
    """Load a features file (NPZ or Parquet) and its labels (from ``pairs`` or the file's ``issame``)."""
    path = Path(features)
    if not path.is_file():
        raise DataError("features file not found", path=path)
    data = _load_parquet(path) if path.suffix == ".parquet" else _load_npz(path)
    if "embeddings" not in data:
        raise DataError(f"features file has no 'embeddings' (keys: {sorted(data)})", path=path)
    emb = np.asarray(data["embeddings"])
    if emb.ndim != 2:
        raise DataError(f"'embeddings' must be (2P, D), got {emb.shape}", path=path)
    fold = None
    if pairs is not None:
        issame, fold = read_pair_labels(pairs)
    elif "issame" in data:
        issame = np.asarray(data["issame"]).astype(bool)
        fold = np.asarray(data["fold"]) if "fold" in data else None
    else:
        raise DataError("no pair labels: pass a pair table or store 'issame' in the features file", path=path)
    if fold is not None and fold.shape != issame.shape:
        raise DataError(f"'fold' has {fold.shape[0]} rows, 'issame' {issame.shape[0]}", path=path)
    if emb.shape[0] != 2 * issame.shape[0]:
        raise DataError(
            f"{emb.shape[0]} embedding rows but {issame.shape[0]} pairs (need 2 rows per pair)", path=path
        )
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        raise DataError("embedding row is not finite", path=path, record=int(bad[0]))
    out = PairFeatures(embeddings=emb, issame=issame, fold=fold)
    for key in ("flipped", "uncertainty", "degradation"):
        if key in data:
            arr = np.asarray(data[key])
            if arr.shape[0] != emb.shape[0]:
                raise DataError(f"'{key}' has {arr.shape[0]} rows, embeddings {emb.shape[0]}", path=path)
            setattr(out, key, arr)
    if out.flipped is not None and out.flipped.shape != emb.shape:
        raise DataError(f"'flipped' {out.flipped.shape} must match embeddings {emb.shape}", path=path)
    if out.uncertainty is not None:
        u = out.uncertainty.reshape(emb.shape[0], -1).astype(np.float64)
        bad = np.flatnonzero(~(np.isfinite(u).all(axis=1) & (u > 0).all(axis=1)))
        if bad.size:
            raise DataError("uncertainty must be finite and > 0", path=path, record=int(bad[0]))
    if "kind" in data or "method" in data:
        from facepipe.uncertainty.registry import KINDS, METHODS  # lazy: torch

        kind = str(data.get("kind", out.kind))
        if kind not in KINDS:
            raise DataError(f"unknown uncertainty kind {kind!r} (one of {sorted(KINDS)})", path=path)
        out.kind = kind
        if "method" in data:
            method = str(data["method"])
            if method not in METHODS or METHODS[method].uncertainty_kind != kind:
                raise DataError(f"method {method!r} does not store uncertainty of kind {kind!r}", path=path)
            out.method = method
    return out
