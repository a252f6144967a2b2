"""The per-chunk worker of the align job: align one chunk of images into rows and rejects.

`align_chunk` is a plain top-level function of one picklable `ChunkTask`, so it runs the same in this
process, in a process pool, or as `ray.remote(align_chunk)` on a cluster. It writes the chunk's rows and
rejects under OUT/_work/ atomically, then a `.done.json` marker: a chunk with a marker is complete, and
running a chunk again rewrites the same files, so an interrupted job resumes without duplicates or gaps.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np

from facepipe.data.align.codec import decode_for_alignment, encode_image
from facepipe.data.align.geometry import align_face, get_template
from facepipe.data.align.plan import ChunkTask, list_identity_files
from facepipe.data.formats.image_header import image_format, size_problem
from facepipe.errors import DataError, FacepipeError
from facepipe.fsutil import escape_name

__all__ = ["REJECT_REASONS", "rejects_schema", "chunk_paths", "ChunkAligner", "align_chunk"]

# Reasons an input image lands in OUT/rejects.parquet.
REJECT_REASONS = {
    "not_an_image": "the content is no known image format (decided by its bytes, never by its name)",
    "decode_failed": "OpenCV could not decode the bytes, or the header gives no size",
    "too_large": "the header declares more pixels than max_pixels: refused before decoding",
    "symlink": "a link (dangling, looping, leaving SRC or pointing back into it): links are not followed",
    "not_a_file": "a FIFO, socket or device, not a regular file",
    "no_face": "the detector found no face",
    "low_score": "the chosen face scored below min_score",
    "bad_landmarks": "the landmarks give no usable transform (degenerate or non-finite)",
    "no_identity_folder": "the file lies directly in SRC, not in an identity folder",
    "read_failed": "the file could not be read",
    "align_failed": "an unexpected error while aligning this image (see detail)",
}

# The columns a chunk fills; the rest of the training schema (degradation) stays null.
_ROW_COLUMNS = ("key", "label", "image", "dataset", "landmarks", "det_score", "source_path")


def rejects_schema():
    """OUT/rejects.parquet: the shared reject columns (source, key, reason) plus where and why in detail."""
    import pyarrow as pa

    from facepipe.data.shards import REJECT_SCHEMA

    extra = [
        pa.field("source_path", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("detail", pa.string()),
    ]
    return pa.schema(list(REJECT_SCHEMA) + extra)


def chunk_paths(work_dir: str | os.PathLike, index: int) -> tuple[Path, Path, Path]:
    """`(rows, rejects, done marker)` files of chunk `index` under the job's work folder."""
    base = Path(work_dir) / f"chunk-{index:06d}"
    return (
        base.with_name(base.name + ".parquet"),
        base.with_name(base.name + ".rejects.parquet"),
        base.with_name(base.name + ".done.json"),
    )


class ChunkAligner:
    """Per-chunk state: the template, the detector (created on first need) and the output rows."""

    def __init__(self, task: ChunkTask):
        self.task = task
        self.settings = task.settings
        self.template = get_template(self.settings.template)
        self._detector = None
        self.rows: dict[str, list] = {name: [] for name in _ROW_COLUMNS}
        self.rejects: dict[str, list] = {name: [] for name in rejects_schema().names}
        self.reasons: dict[str, int] = {}

    def detector(self):
        from facepipe.data.align.detect import cached_detector

        if self._detector is None:
            if not self.settings.detector_model:
                raise FacepipeError(
                    "an image needs face detection but no detector model is configured: pass "
                    "--detector-model PATH (YuNet ONNX) or set align.detector_model, or give landmarks"
                )
            floor = min(self.settings.detect_floor, self.settings.min_score)
            self._detector = cached_detector(self.settings.detector_model, floor, self.settings.max_side)
        return self._detector

    def reject(self, key: int, label: int, source_path: str, reason: str, detail: str = "") -> None:
        source = self.task.shard or source_path
        for name, value in zip(self.rejects, (source, key, reason, source_path, label, detail), strict=True):
            self.rejects[name].append(value)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def process(self, key: int, label: int, source_path: str, data: bytes, landmarks) -> None:
        """Align one image (encoded bytes) into a row, or record why it was rejected.

        One image never stops the run: an unexpected failure (an OpenCV error on a strange file, memory
        for a giant image) becomes an `align_failed` reject. Configuration errors still propagate.
        """
        try:
            self._process(key, label, source_path, data, landmarks)
        except FacepipeError:
            raise
        except Exception as err:  # noqa: BLE001 - recorded with its message, the run goes on
            self.reject(key, label, source_path, "align_failed", f"{type(err).__name__}: {err}"[:500])

    def _process(self, key: int, label: int, source_path: str, data: bytes, landmarks) -> None:
        # type by content and size from the header, before any pixel is decoded
        problem = size_problem(data, self.settings.max_pixels)
        if problem is not None:
            code, detail = problem
            # a shard row claims to be an image: bytes of no known format failed to decode
            reason = "too_large" if code == "too_large" else "decode_failed"
            self.reject(key, label, source_path, reason, detail)
            return
        image, scale = decode_for_alignment(data, self.settings.max_side)
        if image is None:
            self.reject(key, label, source_path, "decode_failed", f"{len(data)} bytes")
            return
        score = None
        if landmarks is not None and scale != 1.0:
            # file landmarks are in full-size pixels; map pixel centres into the reduced image
            landmarks = (np.asarray(landmarks, dtype=np.float64).reshape(5, 2) + 0.5) * scale - 0.5
        if landmarks is None:
            from facepipe.data.align.detect import pick_main_face

            faces = self.detector().detect(image)
            if not faces:
                self.reject(key, label, source_path, "no_face")
                return
            # Choose among confident faces only: a weak false positive must not displace the real face.
            face = pick_main_face([f for f in faces if f.score >= self.settings.min_score], image.shape)
            if face is None:
                best = max(f.score for f in faces)
                self.reject(key, label, source_path, "low_score", f"best score {best:.3f}")
                return
            landmarks, score = face.landmarks, face.score
        try:
            crop, _, warped = align_face(
                image, np.asarray(landmarks, dtype=np.float64).reshape(5, 2), self.template
            )
        except ValueError as err:
            self.reject(key, label, source_path, "bad_landmarks", str(err))
            return
        encoded = encode_image(crop, self.settings.image_format, self.settings.jpeg_quality)
        values = (
            key,
            label,
            encoded,
            self.settings.dataset,
            warped.astype(np.float32).ravel().tolist(),
            score,
            source_path,
        )
        for name, value in zip(self.rows, values, strict=True):
            self.rows[name].append(value)

    def write(self) -> dict:
        """Write the chunk's rows and rejects, then its done marker (last: it certifies the other two)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from facepipe.data.shards import TRAIN_SCHEMA, conform
        from facepipe.fsutil import atomic_path, write_json_atomic

        rows_path, rejects_path, done_path = chunk_paths(self.task.work_dir, self.task.index)
        row_schema = pa.schema([TRAIN_SCHEMA.field(name) for name in _ROW_COLUMNS])
        table = conform(pa.table(self.rows, schema=row_schema), TRAIN_SCHEMA)
        with atomic_path(rows_path) as tmp:
            # Small row groups keep the finishing step's memory flat whatever the chunk size.
            pq.write_table(table, tmp, row_group_size=1024, compression="none")
        with atomic_path(rejects_path) as tmp:
            pq.write_table(pa.table(self.rejects, schema=rejects_schema()), tmp)
        stats = {
            "index": self.task.index,
            "aligned": table.num_rows,
            "rejected": len(self.rejects["key"]),
            "reasons": self.reasons,
            "detected": int(sum(s is not None for s in self.rows["det_score"])),
        }
        write_json_atomic(done_path, stats)
        return stats


def align_chunk(task: ChunkTask) -> dict:
    """Align one chunk and write its files; returns its counts. Running it again rewrites the same files.

    A plain function of picklable arguments: run it in a process pool, or as `ray.remote(align_chunk)`.
    """
    aligner = ChunkAligner(task)
    landmarks = task.landmarks or {}
    if task.spans:
        key = task.key_offset
        for identity, label, start, stop, expected in task.spans:
            files = list_identity_files(task.source, identity)
            if len(files) != expected:
                raise DataError(
                    f"identity folder changed since the job was planned ({expected} files then, "
                    f"{len(files)} now); start again with a new OUT",
                    path=os.path.join(task.source, identity),
                )
            for rel in files[start:stop]:
                _process_file(aligner, key, label, rel, landmarks)
                key += 1
    else:
        _process_shard_rows(aligner, task, landmarks)
    return aligner.write()


def _process_file(aligner: ChunkAligner, key: int, label: int, path: str, landmarks: dict) -> None:
    # names that are not UTF-8 arrive with surrogate escapes, which Arrow refuses: escaped losslessly
    rel = escape_name(path)
    full = os.path.join(aligner.task.source, path)
    try:
        problem = _not_a_plain_file(aligner.task.source, full)
        if problem is None and label >= 0:
            with open(full, "rb") as handle:  # O_RDONLY on a regular file: cannot block
                data = handle.read()
    except OSError as err:
        aligner.reject(key, label, rel, "read_failed", err.strerror or str(err))
        return
    if problem is not None:
        aligner.reject(key, label, rel, *problem)
    elif label < 0:
        aligner.reject(key, label, rel, "no_identity_folder")
    elif image_format(data) is None:  # any file may lie in a folder: by content, not by name
        aligner.reject(key, label, rel, "not_an_image", f"{len(data)} bytes of no known image format")
    else:
        aligner.process(key, label, rel, data, landmarks.get(path))


def _not_a_plain_file(source: str, full: str) -> tuple[str, str] | None:
    """(reason, detail) for an entry that is not a regular file; links are described, never followed."""
    mode = os.lstat(full).st_mode
    if stat.S_ISREG(mode):
        return None
    if not stat.S_ISLNK(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        return "not_a_file", f"{kind}, not a regular file"
    target = escape_name(os.readlink(full))
    try:
        os.stat(full)
    except OSError as err:
        what = {errno.ELOOP: "loops", errno.ENOENT: "dangles"}.get(err.errno, err.strerror)
        return "symlink", f"link to {target} {what}"
    inside = Path(os.path.realpath(full)).is_relative_to(os.path.realpath(source))
    where = "points back into SRC (its target would be imported twice)" if inside else "leaves SRC"
    return "symlink", f"link to {target} {where}; links are not followed"


def _process_shard_rows(aligner: ChunkAligner, task: ChunkTask, landmarks: dict) -> None:
    import pyarrow.parquet as pq

    path = os.path.join(task.source, task.shard)
    handle = pq.ParquetFile(path)
    names = set(handle.schema_arrow.names)
    missing = {"key", "label", "image"} - names
    if missing:
        raise DataError(f"shard lacks column(s) {sorted(missing)}", path=path)
    columns = ["key", "label", "image"] + [c for c in ("landmarks", "source_path") if c in names]
    for group in task.row_groups:
        table = handle.read_row_group(group, columns=columns)
        data = table.to_pydict()
        for i, key in enumerate(data["key"]):
            label = data["label"][i]
            source_path = data["source_path"][i] if "source_path" in data else None
            source_path = source_path or f"{task.shard}#key={key}"
            points = data["landmarks"][i] if "landmarks" in data else None
            if points is None:
                points = landmarks.get(source_path, landmarks.get(str(key)))
            if points is not None:
                points = np.asarray(points, dtype=np.float64).ravel()
                if points.size != 10:
                    aligner.reject(
                        key, label, source_path, "bad_landmarks", f"{points.size} values, expected 10"
                    )
                    continue
            aligner.process(int(key), int(label), source_path, data["image"][i] or b"", points)
