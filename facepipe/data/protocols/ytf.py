"""YouTube-Faces-style video verification: a frames folder + `splits.txt` -> frame and video-pair tables.

Layout (as YTF's `frame_images_DB`): `ROOT/<Name>/<video>/<frame>.jpg` (YTF names frames
`<video>.<n>.jpg`; any image name works, frames are taken in natural order). `splits.txt` has a header
line (`split number, first name, second name, ...`) and then comma-separated rows
`<split>, <Name>/<video>, <Name>/<video>, ..., <is same 0|1>`: the split (1-based fold) first, the two
videos next, the same/different label last (YTF puts a name-match column before it; it is not used).
5 points per frame come from a landmark file (`<Name>/<video>/<frame>.jpg x1 y1 ... x5 y5`), else a
detector model is needed.

Output (OUT/): frames.parquet (image, video, frame, identity), video_pairs.parquet (video_a, video_b,
issame, fold with 0-based folds), protocol.json with kind "video".
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facepipe.data.formats.landmarks import load_landmarks
from facepipe.data.protocols import align_files, bad_line, make_aligner, read_lines, write_protocol_info
from facepipe.errors import DataError
from facepipe.fsutil import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def read_splits(path: str | os.PathLike) -> list[tuple[str, str, bool, int]]:
    """`(video_a, video_b, issame, fold)` per row, fold 0-based."""
    rows = []
    for lineno, line in enumerate(read_lines(path, "splits file"), start=1):
        fields = [f.strip() for f in line.split(",")]
        if not any(fields):
            continue
        if lineno == 1 and not fields[0].isdigit():
            continue  # the header line
        if len(fields) < 4 or not fields[0].isdigit() or fields[-1] not in ("0", "1") or "/" not in fields[1]:
            raise bad_line(path, lineno, "expected '<split>, <Name>/<video>, <Name>/<video>, ..., <0|1>'")
        if int(fields[0]) < 1:
            raise bad_line(path, lineno, "split numbers start at 1")
        rows.append((fields[1].strip("/"), fields[2].strip("/"), fields[-1] == "1", int(fields[0]) - 1))
    return rows


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_frames(root: Path, video: str, max_frames: int | None) -> list[str]:
    folder = root / video
    if not folder.is_dir():
        return []
    frames = sorted((p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural)
    if max_frames is not None and len(frames) > max_frames:  # evenly spaced, first and last kept
        frames = [frames[i] for i in np.linspace(0, len(frames) - 1, max_frames).round().astype(int)]
    return [f"{video}/{f}" for f in frames]


def read_ytf(
    root: str | os.PathLike,
    splits_file: str | os.PathLike,
    out: str | os.PathLike,
    landmarks_file: str | os.PathLike | None = None,
    *,
    max_frames: int | None = None,
    template: str = "arcface",
    detector_model: str | None = None,
) -> dict:
    """Align the frames of every video the splits name and write the frame and video-pair tables."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise DataError("frames folder not found", path=str(root))
    pairs = read_splits(splits_file)
    videos = sorted({v for a, b, *_ in pairs for v in (a, b)})
    marks = load_landmarks(landmarks_file) if landmarks_file is not None else {}
    frames = {v: list_frames(root, v, max_frames) for v in videos}
    if detector_model is None:
        unmarked = [f for fs in frames.values() for f in fs if f not in marks]
        if unmarked:
            where = str(landmarks_file) if landmarks_file is not None else str(root)
            raise DataError(
                f"{len(unmarked)} frames have no landmarks (first: {unmarked[0]}); give a landmark file or a "
                "detector model",
                path=where,
            )
    aligner = make_aligner(template, detector_model, dataset="ytf")
    items = [(f, marks.get(f)) for v in videos for f in frames[v]]
    crops, rejects = align_files(root, items, aligner)
    kept = [(f, v) for v in videos for f in frames[v] if f in crops]
    has_frames = {v for _, v in kept}
    video_ids = {v: i for i, v in enumerate(v for v in videos if v in has_frames)}  # dense over kept videos
    usable = [p for p in pairs if p[0] in has_frames and p[1] in has_frames]
    out.mkdir(parents=True, exist_ok=True)
    frame_table = pa.table(
        {
            "image": pa.array([crops[f] for f, _ in kept], pa.binary()),
            "video": pa.array([video_ids[v] for _, v in kept], pa.int64()),
            "frame": pa.array([f for f, _ in kept], pa.string()),
            "identity": pa.array([v.split("/", 1)[0] for _, v in kept], pa.string()),
        }
    )
    pair_table = pa.table(
        {
            "video_a": pa.array([video_ids[a] for a, *_ in usable], pa.int64()),
            "video_b": pa.array([video_ids[b] for _, b, *_ in usable], pa.int64()),
            "issame": pa.array([s for *_, s, _ in usable], pa.bool_()),
            "fold": pa.array([f for *_, f in usable], pa.int32()),
        }
    )
    for name, table in (("frames.parquet", frame_table), ("video_pairs.parquet", pair_table)):
        with atomic_path(out / name) as tmp:
            pq.write_table(table, tmp)
    info = {
        "kind": "video",
        "videos": len(has_frames),
        "frames": len(kept),
        "pairs": len(usable),
        "listed": len(pairs),
        "left_out": len(pairs) - len(usable),
        "video_names": list(video_ids),
        "rejected": rejects,
    }
    write_protocol_info(out, info)
    return info
