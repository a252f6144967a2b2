"""LFW-style verification: an image folder + `pairs.txt` (+ a 5-point landmark file) -> a pair table.

Layout (as released by UMass): `ROOT/<Name>/<Name>_<NNNN>.jpg`; `pairs.txt` starts with a header
`<folds>\t<pairs per fold>` (View 2: `10\t300`), then each fold lists its matched lines `name i j` and
then its mismatched lines `name1 i name2 j`. The landmark file (e.g. SphereFace's `lfw_landmark.txt`)
gives `<Name>/<Name>_<NNNN>.jpg x1 y1 ... x5 y5` in original pixels. Without it a detector is needed.

Output: OUT/pairs/<name>.parquet in the decode stage's pair format (so `facepipe evaluate --model M
--shards OUT` and training's per-epoch evaluation read it), with each pair's fold from the file's own
fold structure; pairs whose images are absent or rejected are left out and counted.
"""

from __future__ import annotations

import os
from pathlib import Path

from facepipe.data.align.pairs import read_pairs_file
from facepipe.data.dataset import Dataset, pair_table_relpath
from facepipe.data.formats.landmarks import load_landmarks, normalise_key
from facepipe.data.protocols import align_files, bad_line, make_aligner, read_lines, write_protocol_info
from facepipe.data.shards import write_pair_table
from facepipe.errors import DataError


def pairs_header(path: str | os.PathLike) -> tuple[int, int] | None:
    """`(folds, pairs per fold and class)` from an LFW header line, or None when the file has none."""
    for lineno, line in enumerate(read_lines(path, "pairs file"), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) == 2 and all(f.isdigit() for f in fields):
            folds, per_fold = int(fields[0]), int(fields[1])
            if folds < 1 or per_fold < 1:
                raise bad_line(
                    path, lineno, f"header '{line.strip()}': folds and pairs per fold must be >= 1"
                )
            return folds, per_fold
        return None
    return None


def read_lfw(
    root: str | os.PathLike,
    pairs_file: str | os.PathLike,
    out: str | os.PathLike,
    landmarks_file: str | os.PathLike | None = None,
    template: str = "arcface",
    detector_model: str | None = None,
    name: str | None = None,
) -> dict:
    """Align the images `pairs_file` names under ROOT and write OUT/pairs/<name>.parquet; returns its entry.

    Raises DataError naming the file and line for a malformed pairs or landmark line, or when the
    header's fold count disagrees with the number of pair lines.
    """
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise DataError("LFW image folder not found", path=str(root))
    pairs = [(normalise_key(a), normalise_key(b), same) for a, b, same in read_pairs_file(pairs_file)]
    header = pairs_header(pairs_file)
    if header is not None:
        folds, per_fold = header
        if folds * per_fold * 2 != len(pairs):
            raise DataError(
                f"header says {folds} folds x {per_fold} matched + {per_fold} mismatched pairs "
                f"= {folds * per_fold * 2}, the file lists {len(pairs)}",
                path=str(pairs_file),
                record="line 1",
            )
        fold_of = [i // (2 * per_fold) for i in range(len(pairs))]
    else:
        fold_of = None  # no header: InsightFace's contiguous 10-fold split of the kept pairs
    marks = load_landmarks(landmarks_file) if landmarks_file is not None else {}
    wanted = sorted({p for a, b, _ in pairs for p in (a, b)})
    present = [p for p in wanted if (root / p).is_file()]
    if marks:
        missing = [p for p in present if p not in marks]
        if missing and detector_model is None:
            raise DataError(
                f"{len(missing)} images have no landmarks (first: {missing[0]}) and no detector is given",
                path=str(landmarks_file),
            )
    aligner = make_aligner(template, detector_model, dataset="lfw")
    crops, rejects = align_files(root, [(p, marks.get(p)) for p in present], aligner)
    kept = [i for i, (a, b, _) in enumerate(pairs) if a in crops and b in crops]
    images = [crops[p] for i in kept for p in pairs[i][:2]]
    name = name or Path(pairs_file).stem
    entry = write_pair_table(
        Dataset.at(out).pair_table_path(name),
        images,
        [pairs[i][2] for i in kept],
        folds=None if fold_of is None else [fold_of[i] for i in kept],
    )
    entry.update(
        listed=len(pairs),
        left_out=len(pairs) - len(kept),
        missing_images=len(wanted) - len(present),
        rejected=rejects,
        path=pair_table_relpath(name),
    )
    write_protocol_info(out, {"kind": "pairs", "source": str(root), "tables": {name: entry}})
    return entry
