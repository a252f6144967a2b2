"""Readers for the evaluation layouts people already have, turned into facepipe's protocol tables.

- `lfw`: an LFW-style image folder + `pairs.txt` (+ a 5-point landmark file) -> OUT/pairs/<name>.parquet;
- `ijb`: the IJB-B/C release layout (`loose_crop/`, `meta/*_face_tid_mid.txt`, `*_template_pair_label.txt`,
  `*_name_5pts_score.txt`, the 1:N gallery/probe CSVs) -> OUT/images.parquet + template tables;
- `ytf`: a YouTube-Faces-style frames folder + `splits.txt` -> OUT/frames.parquet + OUT/video_pairs.parquet.

Every image goes through the align stage's own per-image aligner (`align.worker.ChunkAligner`), so the
crops are the ones `facepipe align` would write; with landmarks given no detector is needed.
Each folder gets `protocol.json` ({"kind": "pairs" | "ijb" | "video", ...}) so `facepipe evaluate
--protocol DIR` knows what to run.
"""

from __future__ import annotations

import os
from collections.abc import Container, Iterable, Iterator
from pathlib import Path

import numpy as np

from facepipe.data.align.plan import AlignSettings, ChunkTask
from facepipe.data.align.worker import ChunkAligner
from facepipe.errors import DataError
from facepipe.fsutil import write_json_atomic

PROTOCOL_FILE = "protocol.json"


def make_aligner(
    template: str = "arcface", detector_model: str | None = None, dataset: str = ""
) -> ChunkAligner:
    """The align stage's per-image aligner outside a chunk job (no work dir is written)."""
    settings = AlignSettings(template=template, detector_model=detector_model, dataset=dataset)
    return ChunkAligner(ChunkTask(index=0, work_dir="", source="", settings=settings))


def align_files(
    root: str | os.PathLike,
    items: Iterable[tuple[str, np.ndarray | None]],
    aligner: ChunkAligner,
) -> tuple[dict[str, bytes], dict[str, str]]:
    """Align `(relative path, landmarks or None)` under ROOT: ({path: crop bytes}, {path: reject reason})."""
    root = Path(root)
    crops: dict[str, bytes] = {}
    for key, (rel, points) in enumerate(items):
        before = len(aligner.rows["image"])
        try:
            data = (root / rel).read_bytes()
        except OSError as err:
            aligner.reject(key, -1, rel, "read_failed", str(err))
            continue
        aligner.process(key, -1, rel, data, points)
        if len(aligner.rows["image"]) > before:
            crops[rel] = aligner.rows["image"][-1]
    rejects = dict(zip(aligner.rejects["source_path"], aligner.rejects["reason"], strict=True))
    return crops, rejects


def write_protocol_info(out: str | os.PathLike, info: dict) -> Path:
    path = Path(out) / PROTOCOL_FILE
    write_json_atomic(path, info)
    return path


def read_protocol_info(folder: str | os.PathLike) -> dict:
    import json

    path = Path(folder) / PROTOCOL_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(
            f"not a protocol folder (no readable {PROTOCOL_FILE}): {err}", path=str(path)
        ) from err


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise DataError(f"{what} not found", path=str(path)) from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {what}: {err}", path=str(path)) from err


def bad_line(path: str | os.PathLike, lineno: int, message: str) -> DataError:
    """The one error a malformed protocol line gives: the file, the line number, what was expected."""
    return DataError(message, path=str(path), record=f"line {lineno}")


def field_rows(
    path: str | os.PathLike, what: str, counts: Container[int], expected: str
) -> Iterator[tuple[int, list[str]]]:
    """`(line number, fields)` of each non-blank line of a whitespace-separated list file.

    A line whose field count is not in `counts` is the DataError "expected <expected>, got <n> fields".
    """
    for lineno, line in enumerate(read_lines(path, what), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in counts:
            raise bad_line(path, lineno, f"expected {expected}, got {len(fields)} fields")
        yield lineno, fields
