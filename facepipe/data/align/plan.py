"""Planning an align job: its settings, listing the input once, and cutting it into chunk tasks.

The plan (a JSON-able dict, saved as OUT/_work/plan.json) fixes what every chunk holds, so a resumed
run processes exactly the same images under the same keys. Inputs are either identity folders (identity
= top-level folder, labels in sorted name order) or Parquet shards of unaligned images.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from facepipe.data.dataset import MANIFEST_NAME, TRAIN_DIR
from facepipe.data.formats.image_header import DEFAULT_MAX_PIXELS, HEADER_BYTES, image_format
from facepipe.errors import DataError, FacepipeError
from facepipe.fsutil import sha256_file

__all__ = [
    "PLAN_VERSION",
    "AlignSettings",
    "ChunkTask",
    "list_identity_files",
    "looks_like_image",
    "find_input_shards",
    "plan_job",
    "plan_digest",
    "hash_input",
    "missing_landmarks",
    "make_tasks",
    "read_json",
]

PLAN_VERSION = 1


@dataclass(frozen=True)
class AlignSettings:
    """Everything that changes the output; a resumed run must use the same values."""

    template: str = "arcface"
    detector_model: str | None = None
    min_score: float = 0.6
    # Detector threshold: faces between it and min_score are reported as low_score, not no_face.
    detect_floor: float = 0.3
    max_side: int = 1024
    image_format: str = "jpg"
    jpeg_quality: int = 95
    dataset: str = ""
    # Images whose header declares more pixels are rejected before decoding (a pixel bomb).
    max_pixels: int = DEFAULT_MAX_PIXELS

    def fingerprint(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ChunkTask:
    """One unit of work. `spans` (folders): `(identity, label, start, stop, expected_count)` slices of
    each identity's sorted file list; `shard`/`row_groups` (shards): row groups of one input shard."""

    index: int
    work_dir: str
    source: str
    settings: AlignSettings
    key_offset: int = 0
    spans: tuple = ()
    shard: str = ""
    row_groups: tuple = ()
    landmarks: dict | None = None  # key (path relative to source) -> 10 floats


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file the job wrote (plan, chunk marker, manifest); DataError naming it when unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read JSON: {err}", path=str(path)) from err


def hash_input(path: str | os.PathLike) -> str:
    """SHA-256 of an input file (landmarks, pairs) for the plan; DataError naming it when unreadable."""
    try:
        return sha256_file(path)
    except OSError as err:
        raise DataError(f"cannot read: {err.strerror}", path=str(path)) from err


def plan_digest(plan: dict) -> str:
    """The identity of a job: equal digests mean the same inputs, settings and chunking."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def list_identity_files(root: str | os.PathLike, identity: str) -> list[str]:
    """Sorted paths (relative to `root`, `/`-separated) of every entry under `root/identity` that is not
    a real folder: files, but also links (to anything: links are never followed), FIFOs, sockets, so
    that each lands in the shards or in the rejects with a reason, never nowhere.

    `identity == ""` lists those directly in `root` (they have no identity folder).
    """
    base = os.path.join(root, identity) if identity else os.fspath(root)
    if not identity:
        return sorted(e.name for e in os.scandir(base) if not e.is_dir(follow_symlinks=False))
    found = []
    # followlinks=False: linked folders are not entered; a folder that cannot be listed is an error,
    # not a silent gap (os.walk skips it by default)
    for dirpath, dirnames, filenames in os.walk(base, onerror=_unlistable):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        linked = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = sorted(set(dirnames) - set(linked))
        found += [f"{rel_dir}/{name}" for name in filenames + linked]
    return sorted(found)


def _unlistable(err: OSError) -> None:
    raise DataError(f"cannot list folder: {err.strerror}", path=err.filename)


def looks_like_image(path: str | os.PathLike) -> bool:
    """Whether `path` is a regular file (not a link) whose first bytes are a known image's: by content,
    never by name."""
    try:
        if not os.path.isfile(path) or os.path.islink(path):
            return False
        with open(path, "rb") as handle:
            return image_format(handle.read(HEADER_BYTES)) is not None
    except OSError:
        return False


def find_input_shards(src: str | os.PathLike) -> list[Path]:
    """Parquet inputs: SRC itself when it is a file, else SRC/train/*.parquet, else SRC/*.parquet."""
    src = Path(src)
    if src.is_file():
        return [src]
    train = sorted((src / TRAIN_DIR).glob("*.parquet")) if (src / TRAIN_DIR).is_dir() else []
    return [p for p in train or sorted(src.glob("*.parquet")) if not p.name.startswith(".")]


def plan_job(
    src: str | os.PathLike, settings: AlignSettings, chunk_size: int = 500, landmarks_file=None
) -> dict:
    """Scan SRC and cut it into chunks; returns the plan (a JSON-able dict) without landmark values."""
    src = Path(src)
    if not src.exists():
        raise FacepipeError(f"source not found: {src}")
    if chunk_size < 1:
        raise FacepipeError("chunk size must be at least 1")
    plan = {
        "version": PLAN_VERSION,
        "source": os.fspath(src.resolve()),
        "settings": settings.fingerprint(),
        "chunk_size": chunk_size,
        "landmarks_file": os.fspath(Path(landmarks_file).resolve()) if landmarks_file else None,
        "landmarks_sha256": hash_input(landmarks_file) if landmarks_file else None,
    }
    shards = find_input_shards(src)
    decode_layout = (src / TRAIN_DIR).is_dir() and any((src / TRAIN_DIR).glob("*.parquet"))
    if src.is_file() or decode_layout or (shards and not _has_identity_folders(src)):
        plan.update(_plan_shards(src, shards, chunk_size))
    else:
        plan.update(_plan_folders(src, chunk_size))
    return plan


def _has_identity_folders(src: Path) -> bool:
    return any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(src))


def _plan_folders(src: Path, chunk_size: int) -> dict:
    """Identity = top-level folder (sorted names -> labels 0..C-1); files directly in SRC are rejects."""
    entries = sorted(os.scandir(src), key=lambda e: e.name)
    identities: list[list] = []
    chunks: list[dict] = []
    spans: list[list] = []
    filled = key = chunk_start = 0
    empty = hidden = 0

    def add(identity: str, label: int, count: int) -> None:
        nonlocal filled, key, chunk_start, spans
        start = 0
        while start < count:
            take = min(count - start, chunk_size - filled)
            spans.append([identity, label, start, start + take, count])
            start += take
            filled += take
            key += take
            if filled == chunk_size:
                chunks.append({"key_offset": chunk_start, "spans": spans})
                spans, filled, chunk_start = [], 0, key

    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):  # a linked folder is a reject, not an identity
            continue
        if entry.name.startswith("."):
            hidden += 1  # .git, .ipynb_checkpoints ...: not identities
            continue
        count = len(list_identity_files(src, entry.name))
        if count == 0:
            empty += 1
            continue
        label = len(identities)
        identities.append([entry.name, count])
        add(entry.name, label, count)
    loose = sum(1 for e in entries if not e.is_dir(follow_symlinks=False))
    if loose:
        add("", -1, loose)
    if spans:
        chunks.append({"key_offset": chunk_start, "spans": spans})
    return {
        "kind": "folders",
        "identities": identities,
        "chunks": chunks,
        "num_inputs": key,
        "skipped_folders": {"empty": empty, "hidden": hidden},
    }


def _plan_shards(src: Path, shards: list[Path], chunk_size: int) -> dict:
    """Chunks of whole row groups (at least `chunk_size` rows each, except a shard's last)."""
    import pyarrow.parquet as pq

    base = src.parent if src.is_file() else src
    chunks: list[dict] = []
    total = 0
    for path in shards:
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad footer
            raise DataError(f"cannot read Parquet footer: {err}", path=os.fspath(path)) from err
        rel = os.path.relpath(path, base).replace(os.sep, "/")
        groups: list[int] = []
        rows = 0
        for group in range(meta.num_row_groups):
            groups.append(group)
            rows += meta.row_group(group).num_rows
            if rows >= chunk_size:
                chunks.append({"shard": rel, "row_groups": groups, "rows": rows})
                total += rows
                groups, rows = [], 0
        if groups:
            chunks.append({"shard": rel, "row_groups": groups, "rows": rows})
            total += rows
    plan = {"kind": "shards", "base": os.fspath(base.resolve()), "chunks": chunks, "num_inputs": total}
    manifest = base / MANIFEST_NAME
    if manifest.is_file():  # a decoded dataset: its class count holds even if a class loses every image
        plan["num_classes"] = int(read_json(manifest).get("num_classes") or 0) or None
    return plan


def missing_landmarks(plan: dict, by_identity: dict) -> tuple[int, str | None]:
    """How many folder images have no landmark entry (they need the detector), and one example."""
    missing, example = 0, None
    for name, _count in plan["identities"]:
        known = by_identity.get(name, {})
        for rel in list_identity_files(plan["source"], name):
            if rel not in known and looks_like_image(os.path.join(plan["source"], rel)):
                missing += 1
                example = example or rel
    return missing, example


def _chunk_landmarks(spans, by_identity: dict) -> dict:
    found: dict = {}
    for identity, *_ in spans:
        found.update(by_identity.get(identity, {}))
    return found


def make_tasks(plan: dict, work_dir: str | os.PathLike, table: dict | None) -> list[ChunkTask]:
    """The plan's chunks as tasks, each carrying only its own landmark entries."""
    from facepipe.data.formats.landmarks import group_by_identity

    settings = AlignSettings(**plan["settings"])
    tasks = []
    if plan["kind"] == "folders":
        by_identity = group_by_identity(table or {})
        for index, chunk in enumerate(plan["chunks"]):
            spans = tuple(tuple(s) for s in chunk["spans"])
            tasks.append(
                ChunkTask(
                    index,
                    os.fspath(work_dir),
                    plan["source"],
                    settings,
                    chunk["key_offset"],
                    spans=spans,
                    landmarks=_chunk_landmarks(spans, by_identity),
                )
            )
    else:
        for index, chunk in enumerate(plan["chunks"]):
            tasks.append(
                ChunkTask(
                    index,
                    os.fspath(work_dir),
                    plan["base"],
                    settings,
                    shard=chunk["shard"],
                    row_groups=tuple(chunk["row_groups"]),
                    landmarks=table,
                )
            )
    return tasks
