"""The IJB-B / IJB-C release layout (as InsightFace distributes it) -> facepipe's template tables.

ROOT/
  loose_crop/<n>.jpg                         the face images (loosely cropped)
  meta/<p>_name_5pts_score.txt               `<n>.jpg x1 y1 ... x5 y5 <detector score>`, space separated
  meta/<p>_face_tid_mid.txt                  `<n>.jpg <template id> <media id>` (derived sets add a 4th
                                             column, the subject id; it is ignored)
  meta/<p>_template_pair_label.txt           `<template 1> <template 2> <1|0>` (the 1:1 protocol)
  meta/<p>_1N_gallery_G1.csv, _G2.csv        1:N (IJB-B: _S1.csv, _S2.csv), header row, then one row per
  meta/<p>_1N_probe_mixed.csv                image: TEMPLATE_ID,SUBJECT_ID,FILENAME,... (optional)
with <p> = ijbc or ijbb. Quirks kept from InsightFace's `eval_ijbc.py`: the 5-point file and the
tid/mid file are parallel (row i of one is row i of the other: checked here, name by name); the media
id groups frames of one video; the detector score is the `faceness` weight of the image feature.

Output (OUT/): images.parquet (image, name, template, media, faceness), template_pairs.parquet (t1, t2,
label), and with the 1:N files gallery.parquet (template, subject, gallery) and probe.parquet
(template, subject) with one row per template; protocol.json says kind "ijb".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facepipe.data.protocols import (
    align_files,
    bad_line,
    field_rows,
    make_aligner,
    read_lines,
    write_protocol_info,
)
from facepipe.errors import DataError
from facepipe.fsutil import atomic_path

GALLERY_SETS = {"ijbc": ("G1", "G2"), "ijbb": ("S1", "S2")}


def find_prefix(root: Path) -> str:
    for prefix in GALLERY_SETS:
        if (root / "meta" / f"{prefix}_face_tid_mid.txt").is_file():
            return prefix
    raise DataError(
        "not an IJB layout: no meta/ijbc_face_tid_mid.txt or meta/ijbb_face_tid_mid.txt", path=str(root)
    )


def _ints(path: Path, lineno: int, fields: list[str], what: str) -> list[int]:
    try:
        return [int(f) for f in fields]
    except ValueError:
        raise bad_line(path, lineno, f"expected integer {what}, got {' '.join(fields)!r}") from None


def read_tid_mid(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, tids, mids = [], [], []
    expected = "'<image> <template id> <media id>'"
    for lineno, fields in field_rows(path, "template/media list", (3, 4), expected):
        t, m = _ints(path, lineno, fields[1:3], "template and media ids")
        names.append(fields[0])
        tids.append(t)
        mids.append(m)
    return names, np.array(tids, np.int64), np.array(mids, np.int64)


def read_pair_labels(path: Path) -> np.ndarray:
    rows = []
    expected = "'<template 1> <template 2> <0|1>'"
    for lineno, fields in field_rows(path, "template pair list", (3,), expected):
        t1, t2, label = _ints(path, lineno, fields, "template ids and label")
        if label not in (0, 1):
            raise bad_line(path, lineno, f"label must be 0 or 1, got {label}")
        rows.append((t1, t2, label))
    return np.array(rows, np.int64).reshape(-1, 3)


def read_5pts(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, points, scores = [], [], []
    expected = "'<image> x1 y1 ... x5 y5 <score>' (12 fields)"
    for lineno, fields in field_rows(path, "landmark/score list", (12,), expected):
        try:
            values = np.array([float(f) for f in fields[1:]], np.float64)
        except ValueError:
            raise bad_line(path, lineno, "non-numeric landmark or score") from None
        if not np.all(np.isfinite(values)):
            raise bad_line(path, lineno, "non-finite landmark or score")
        names.append(fields[0])
        points.append(values[:10].reshape(5, 2))
        scores.append(values[10])
    return names, np.array(points).reshape(-1, 5, 2), np.array(scores, np.float64)


def read_1n_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(template, subject) per template from a 1:N CSV (header row; one row per image)."""
    lines = read_lines(path, "1:N template list")
    t_col, s_col, start = 0, 1, 1
    header = [h.strip().upper() for h in lines[0].split(",")] if lines else []
    if "TEMPLATE_ID" in header and "SUBJECT_ID" in header:
        t_col, s_col = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
    elif header and header[0].isdigit():
        start = 0  # no header row
    seen: dict[int, int] = {}
    for lineno, line in enumerate(lines[start:], start=start + 1):
        fields = [f.strip() for f in line.split(",")]
        if not any(fields):
            continue
        if len(fields) <= max(t_col, s_col):
            raise bad_line(path, lineno, "expected TEMPLATE_ID,SUBJECT_ID,... columns")
        t, s = _ints(path, lineno, [fields[t_col], fields[s_col]], "TEMPLATE_ID and SUBJECT_ID")
        if seen.setdefault(t, s) != s:
            raise bad_line(path, lineno, f"template {t} has subjects {seen[t]} and {s}")
    return np.array(list(seen), np.int64), np.array(list(seen.values()), np.int64)


def _write(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_ijb(
    root: str | os.PathLike, out: str | os.PathLike, template: str = "arcface", limit: int | None = None
) -> dict:
    """Align every listed image with its 5 points and write the template tables; returns a summary."""
    root, out = Path(root), Path(out)
    prefix = find_prefix(root)
    meta = root / "meta"
    names, tids, mids = read_tid_mid(meta / f"{prefix}_face_tid_mid.txt")
    pts_path = meta / f"{prefix}_name_5pts_score.txt"
    pts_names, points, faceness = read_5pts(pts_path)
    if len(pts_names) != len(names):
        raise DataError(
            f"{len(pts_names)} landmark rows for {len(names)} images in the tid/mid list", path=str(pts_path)
        )
    for i, (a, b) in enumerate(zip(names, pts_names, strict=True)):
        if a != b:  # InsightFace pairs the two files by row: a reordering would mix faces up silently
            raise DataError(f"row {i + 1} names {b}, the tid/mid list names {a} there", path=str(pts_path))
    pairs = read_pair_labels(meta / f"{prefix}_template_pair_label.txt")
    n = len(names) if limit is None else min(limit, len(names))
    aligner = make_aligner(template, None, dataset=prefix)
    crops, rejects = align_files(root / "loose_crop", [(names[i], points[i]) for i in range(n)], aligner)
    keep = [i for i in range(n) if names[i] in crops]
    out.mkdir(parents=True, exist_ok=True)
    _write(
        out / "images.parquet",
        pa.table(
            {
                "image": pa.array([crops[names[i]] for i in keep], pa.binary()),
                "name": pa.array([names[i] for i in keep], pa.string()),
                "template": pa.array(tids[keep], pa.int64()),
                "media": pa.array(mids[keep], pa.int64()),
                "faceness": pa.array(faceness[keep], pa.float32()),
            }
        ),
    )
    _write(
        out / "template_pairs.parquet", pa.table({"t1": pairs[:, 0], "t2": pairs[:, 1], "label": pairs[:, 2]})
    )
    info = {
        "kind": "ijb",
        "prefix": prefix,
        "images": len(keep),
        "templates": int(np.unique(tids[keep]).size),
        "pairs": int(pairs.shape[0]),
        "rejected": rejects,
    }
    g_files = [meta / f"{prefix}_1N_gallery_{g}.csv" for g in GALLERY_SETS[prefix]]
    probe_file = meta / f"{prefix}_1N_probe_mixed.csv"
    if probe_file.is_file() and all(p.is_file() for p in g_files):
        parts = [(read_1n_csv(p), g) for p, g in zip(g_files, GALLERY_SETS[prefix], strict=True)]
        _write(
            out / "gallery.parquet",
            pa.table(
                {
                    "template": np.concatenate([t for (t, _), _ in parts]),
                    "subject": np.concatenate([s for (_, s), _ in parts]),
                    "gallery": [g for (t, _), g in parts for _ in range(t.shape[0])],
                }
            ),
        )
        pt, ps = read_1n_csv(probe_file)
        _write(out / "probe.parquet", pa.table({"template": pt, "subject": ps}))
        info.update(
            gallery_templates=int(sum(t.shape[0] for (t, _), _ in parts)), probe_templates=int(pt.shape[0])
        )
    write_protocol_info(out, info)
    return info
