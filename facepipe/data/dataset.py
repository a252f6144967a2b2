"""A decoded (or aligned) dataset as one object: its layout, manifest, training shards and pair tables.

`facepipe decode` and `facepipe align` write the same layout into OUT, a local folder or a URI
(`s3://bucket/shards`, see :mod:`facepipe.storage`):

    OUT/manifest.json          counts, class count, image size, colour order, shards with sha256, pairs;
                               written (published) last, so its presence means the rest is complete
    OUT/train/part-*.parquet   training shards (`shards.TRAIN_SCHEMA`)
    OUT/pairs/<name>.parquet   verification pair tables (`shards.PAIR_SCHEMA`), with the per-image
                               `degradation_a/b` columns where the source knew them (generated data)
    OUT/rejects.parquet        what was left out, and why
    OUT/labels.json            class name → label (align)

The names are defined here and nowhere else. Readers open a dataset (`Dataset.open`, or `Dataset.at`
for a folder of pair tables that may have no manifest); writers get their paths from `Dataset.create`.
Degradation is read from the pair tables (`pair_degradation`), never from the raw source folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.errors import DataError
from facepipe.fsutil import write_json_atomic
from facepipe.storage import download_tree, exists, is_remote, join, list_files, open_input_file, read_text
from facepipe.storage import write_bytes as write_object

__all__ = [
    "Dataset",
    "LABELS_NAME",
    "MANIFEST_NAME",
    "PAIR_DEGRADATION_COLUMNS",
    "PAIRS_DIR",
    "REJECTS_NAME",
    "SHARD_PREFIX",
    "TRAIN_DIR",
    "list_parquet",
    "pair_table_relpath",
    "read_manifest",
    "read_pair_degradation",
    "shard_relpath",
]

MANIFEST_NAME = "manifest.json"
TRAIN_DIR = "train"
PAIRS_DIR = "pairs"
REJECTS_NAME = "rejects.parquet"
LABELS_NAME = "labels.json"
SHARD_PREFIX = "part"  # training shards are TRAIN_DIR/part-NNNNN.parquet
PAIR_DEGRADATION_COLUMNS = ("degradation_a", "degradation_b")
REQUIRED_KEYS = ("num_images", "num_classes", "shards")  # what every decode/align manifest holds
DEFAULT_COLOR_ORDER = "RGB"

Location = Path | str  # a local path, or a URI under a URI


def _under(location: str | os.PathLike, *parts: str) -> Location:
    return join(location, *parts) if is_remote(location) else Path(location, *parts)


def _layout_part(name: str) -> property:
    """A `Dataset` property: where OUT/`name` is (a Path, or a URI under a URI)."""

    def where(self: Dataset) -> Location:
        return _under(self.location, name)

    return property(where, doc=f"OUT/{name}")


def shard_relpath(filename: str) -> str:
    """A training shard's path as the manifest records it (relative to OUT, with `/`)."""
    return f"{TRAIN_DIR}/{filename}"


def pair_table_relpath(name: str) -> str:
    """Pair table `name`'s path as the manifest records it (relative to OUT, with `/`)."""
    return f"{PAIRS_DIR}/{name}.parquet"


def list_parquet(folder: str | os.PathLike) -> list[Path] | list[str]:
    """The Parquet files directly in `folder`, sorted, temp files (".name") excluded; URIs under a URI."""
    if is_remote(folder):
        return list_files(folder, ".parquet")
    return sorted(p for p in Path(folder).glob("*.parquet") if not p.name.startswith("."))


def read_manifest(location: str | os.PathLike) -> dict:
    """OUT/manifest.json of a dataset, local or at a URI (published last: present = complete)."""
    path = _under(location, MANIFEST_NAME)
    try:
        manifest = json.loads(read_text(path) if is_remote(location) else Path(path).read_text())
    except FileNotFoundError:
        raise DataError(
            "no manifest: not a decoded dataset (run `facepipe decode` first)", str(path)
        ) from None
    except json.JSONDecodeError as err:
        raise DataError(f"manifest is not valid JSON: {err}", str(path)) from None
    except OSError as err:  # object storage unreachable, bucket or permission missing
        raise DataError(f"cannot read the manifest: {err}", str(path)) from None
    if not isinstance(manifest, dict):
        raise DataError("manifest is not a JSON object", str(path))
    return manifest


def read_pair_degradation(path: str | os.PathLike) -> np.ndarray | None:
    """(pairs, 2) float32 degradation of a pair table's images (columns degradation_a/b; NaN where
    null), or None when the table has no such columns or they are all null."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(open_input_file(path) if is_remote(path) else path)
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"cannot read pair table: {err}", str(path)) from None
    with handle:
        if not set(PAIR_DEGRADATION_COLUMNS) <= set(handle.schema_arrow.names):
            return None
        table = handle.read(columns=list(PAIR_DEGRADATION_COLUMNS))
    columns = []
    for name in PAIR_DEGRADATION_COLUMNS:
        column = pc.fill_null(pc.cast(table.column(name), pa.float32()), float("nan"))
        columns.append(column.combine_chunks().to_numpy(zero_copy_only=False))
    out = np.stack(columns, axis=1).astype(np.float32, copy=False).reshape(table.num_rows, 2)
    return None if np.isnan(out).all() else out


class Dataset:
    """A decoded or aligned dataset at `location` (a local folder or a URI).

    `Dataset.open` checks that a complete manifest is there; `Dataset.at` reads nothing until asked (a
    protocol folder of pair tables has no manifest); `Dataset.create` makes a local folder's layout for
    a writer, which publishes the manifest last (`write_manifest`).
    """

    def __init__(self, location: str | os.PathLike, manifest: dict[str, Any] | None = None) -> None:
        self.location: Location = os.fspath(location) if is_remote(location) else Path(location)
        self._manifest = manifest

    def __repr__(self) -> str:
        return f"Dataset({os.fspath(self.location)!r})"

    @classmethod
    def open(cls, location: str | os.PathLike) -> Dataset:
        """An existing dataset; DataError naming the location when its manifest is missing or lacks
        what every decode/align manifest holds (image and class counts, shards)."""
        manifest = read_manifest(location)
        missing = [key for key in REQUIRED_KEYS if key not in manifest]
        if missing:
            raise DataError(
                f"incomplete manifest: no {', '.join(missing)} (not written by `facepipe decode`/`align`)",
                str(_under(location, MANIFEST_NAME)),
            )
        return cls(location, manifest)

    @classmethod
    def at(cls, location: str | os.PathLike) -> Dataset:
        """The dataset layout at `location`, without reading anything yet."""
        return cls(location)

    @classmethod
    def create(cls, location: str | os.PathLike) -> Dataset:
        """A dataset about to be written: the folder and its train/ folder are made (pairs/ comes with
        the first pair table; a URI needs none: objects are published there whole). The writer writes
        the manifest last (`write_manifest`)."""
        dataset = cls(location)
        if not is_remote(dataset.location):
            Path(dataset.train_dir).mkdir(parents=True, exist_ok=True)
        return dataset

    # ------------------------------------------------------------------------------------ layout

    manifest_path = _layout_part(MANIFEST_NAME)
    train_dir = _layout_part(TRAIN_DIR)
    pairs_dir = _layout_part(PAIRS_DIR)
    rejects_path = _layout_part(REJECTS_NAME)
    labels_path = _layout_part(LABELS_NAME)

    def pair_table_path(self, name: str) -> Location:
        return _under(self.location, pair_table_relpath(name))

    def path_of(self, relpath: str) -> Location:
        """A path the manifest records (relative to the dataset, e.g. `train/part-00000.parquet`)."""
        return _under(self.location, *relpath.split("/"))

    # ---------------------------------------------------------------------------------- manifest

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = read_manifest(self.location)
        return self._manifest

    def has_manifest(self) -> bool:
        if self._manifest is not None:
            return True
        return exists(self.manifest_path) if is_remote(self.location) else Path(self.manifest_path).is_file()

    def write_manifest(self, manifest: dict[str, Any]) -> Location:
        """Write the manifest (atomically; a writer does this last: it marks the dataset complete)."""
        path = self.manifest_path
        if is_remote(path):
            write_object(path, (json.dumps(manifest, indent=2) + "\n").encode())
        else:
            write_json_atomic(path, manifest)
        self._manifest = manifest
        return path

    @property
    def num_classes(self) -> int:
        return int(self.manifest.get("num_classes") or 0)

    @property
    def num_images(self) -> int:
        return int(self.manifest.get("num_images") or 0)

    @property
    def image_size(self) -> tuple[int, int] | None:
        size = self.manifest.get("image_size")
        return (int(size[0]), int(size[1])) if size else None

    @property
    def color_order(self) -> str:
        return self.manifest.get("color_order") or DEFAULT_COLOR_ORDER

    @property
    def fingerprint(self) -> str:
        """sha256 identifying the data: the manifest's shard hashes in shard order, its pair tables'
        hashes, and how the images are read (class count, image size, colour order). It does not change
        when the dataset is decoded again from the same inputs or moved, and changes with any shard.
        A manifest without shard hashes is taken whole (canonical JSON)."""
        m = self.manifest
        shards = [s.get("sha256") if isinstance(s, dict) else None for s in m.get("shards") or []]
        if shards and all(shards):
            pairs = m.get("pairs") or {}
            entries = pairs.values() if isinstance(pairs, dict) else pairs
            basis: dict[str, Any] = {
                "shards": shards,
                "pairs": sorted([str(e.get("path")), str(e.get("sha256"))] for e in entries),
                "num_classes": m.get("num_classes"),
                "image_size": m.get("image_size"),
                "color_order": m.get("color_order"),
            }
        else:
            basis = {"manifest": m}
        return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()

    # ------------------------------------------------------------------------------------- parts

    @property
    def training_shards(self) -> list[Path] | list[str]:
        """The training shards in shard order: those the manifest records, else those in train/."""
        recorded = [s.get("path") if isinstance(s, dict) else None for s in self.manifest.get("shards") or []]
        if recorded and all(recorded):
            return [self.path_of(p) for p in recorded]  # type: ignore[return-value]
        return list_parquet(self.train_dir)

    @property
    def pair_tables(self) -> dict[str, Location]:
        """name → pair table (pairs/<name>.parquet), in name order; no manifest needed."""
        return {Path(os.fspath(p)).stem: p for p in list_parquet(self.pairs_dir)}

    def pair_degradation(self, name: str) -> np.ndarray | None:
        """(pairs, 2) degradation of pair table `name`'s images as decode copied it from the source,
        or None where the source had none."""
        tables = self.pair_tables
        if name not in tables:
            raise DataError(f"no pair table {name!r}", str(self.pair_table_path(name)))
        return read_pair_degradation(tables[name])

    def fetch_pairs(self, dst: str | os.PathLike) -> Dataset:
        """A local copy of this dataset's manifest and pair tables (no training shards) in `dst`."""
        manifest = self.manifest  # published last: its presence means the pairs are complete
        local = Dataset(dst)
        download_tree(self.pairs_dir, local.pairs_dir)
        local.write_manifest(manifest)
        return local
