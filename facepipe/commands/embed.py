"""`facepipe embed FOLDER --model URI --out X.parquet`: embeddings and uncertainty of every photo."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from facepipe.commands import options
from facepipe.commands.verify import add_model_options

_DESCRIPTION = """\
Detect, align and embed the main face of every image under FOLDER (recursively) with a
registered model. OUT gets one row per face: path (relative to FOLDER), embedding,
uncertainty (the model's per-image scalar, larger = less reliable; null without an
uncertainty head) and the detector's score. Images that fail (unreadable, no face) go
to OUT's rejects table (X.rejects.parquet) with the reason: nothing is dropped silently."""

BATCH = 64


HELP = "embed every photo of a folder with a registered model"


def register(subparsers) -> None:
    parser = options.stage_parser(subparsers, "embed", HELP, _DESCRIPTION, raw=True)
    parser.add_argument("folder", metavar="FOLDER", type=Path, help="folder of photos (searched recursively)")
    add_model_options(parser)
    parser.add_argument("--out", required=True, type=Path, help="output Parquet file (X.parquet)")
    parser.add_argument(
        "--aligned",
        action="store_true",
        help="the images are already aligned faces: skip detection (the detector score is then null)",
    )
    options.finish(parser, run)


def rejects_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".parquet") + ".rejects.parquet")


def run(args: argparse.Namespace) -> int:
    import time

    from facepipe.commands.verify import make_aligner, open_model
    from facepipe.errors import DataError, FacepipeError
    from facepipe.models.photo import NoFaceError, list_photos, read_photo
    from facepipe.progress import progress, summary

    start = time.monotonic()
    photos = list_photos(args.folder)
    if not photos:
        raise FacepipeError(f"no images (.jpg, .jpeg, .png, .bmp, .webp) under {args.folder}")
    if args.out.resolve().is_relative_to(args.folder.resolve()):
        raise FacepipeError(f"--out {args.out} lies inside {args.folder}; choose a path outside it")
    config = options.load(args)
    rows: dict[str, list[Any]] = {"path": [], "embedding": [], "uncertainty": [], "detection_score": []}
    rejects: dict[str, list[str]] = {"path": [], "reason": [], "detail": []}
    with open_model(args.model, config) as (model, _, registered):
        aligner = None if args.aligned else make_aligner(config, model, registered)
        pending: list[tuple[str, Any, float | None]] = []

        def flush() -> None:
            out = model.embed(model.to_input([crop for _, crop, _ in pending]))
            for i, (rel, _, det) in enumerate(pending):
                rows["path"].append(rel)
                rows["embedding"].append(out["embedding"][i])
                unc = float(out["uncertainty"][i])
                rows["uncertainty"].append(unc if unc == unc else None)
                rows["detection_score"].append(det)
            pending.clear()

        for path in progress(photos, desc="embed", unit="image"):
            rel = path.relative_to(args.folder).as_posix()
            try:
                image = read_photo(path)
                if aligner is None:
                    pending.append((rel, image, None))
                else:
                    face = aligner.align(image, str(path))
                    pending.append((rel, face.crop, face.score))
            except DataError as err:
                reason = "no_face" if isinstance(err, NoFaceError) else "unreadable"
                rejects["path"].append(rel)
                rejects["reason"].append(reason)
                rejects["detail"].append(err.message)
            if len(pending) >= BATCH:
                flush()
        if pending:
            flush()
    _write(args.out, rows, model.info.embedding_size)
    _write_rejects(rejects_path(args.out), rejects)
    reasons = {r: rejects["reason"].count(r) for r in sorted(set(rejects["reason"]))}
    lines = {
        "images": len(photos),
        "embedded": f"{len(rows['path'])} -> {args.out}",
        "rejected": f"{len(rejects['path'])} {reasons or ''} -> {rejects_path(args.out)}".strip(),
        "seconds": f"{time.monotonic() - start:.1f}",
    }
    print(summary(f"facepipe embed: {args.folder} with {args.model}", lines))
    return 0


def _write(path: Path, rows: dict[str, list[Any]], dim: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from facepipe.fsutil import atomic_path

    flat = np.asarray(rows["embedding"], dtype=np.float32).reshape(-1)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
    table = pa.table(
        {
            "path": pa.array(rows["path"], pa.string()),
            "embedding": embedding,
            "uncertainty": pa.array(rows["uncertainty"], pa.float64()),
            "detection_score": pa.array(rows["detection_score"], pa.float64()),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write_rejects(path: Path, rejects: dict[str, list[str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from facepipe.fsutil import atomic_path

    table = pa.table({k: pa.array(v, pa.string()) for k, v in rejects.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
