"""Verification `.bin` files of the sources → `OUT/pairs/<name>.parquet`, one table per file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facepipe.data.dataset import Dataset, pair_table_relpath
from facepipe.data.decode.parse import decode_or_none
from facepipe.data.decode.sidecars import load_pair_degradation, pair_sidecar_path
from facepipe.data.formats.image_header import DEFAULT_MAX_PIXELS
from facepipe.data.formats.insightface import TrainingSet
from facepipe.errors import DataError
from facepipe.fsutil import escape_name

__all__ = ["write_pairs"]


def write_pairs(
    sets: list[TrainingSet], dataset_ids: list[str], out: Path, validate: bool, skip_bad: bool,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[dict[str, dict], list[dict], list[Path]]:  # fmt: skip
    """Write every source's pair tables (and drop those of sources no longer given).

    Returns the manifest entries by table name, the rejects, and the input files read (for hashing).
    A name is the `.bin` stem, prefixed with the dataset id where two sources share a stem.
    """
    from facepipe.data.formats.verification_bin import load_bin
    from facepipe.data.shards import pair_folds, write_pair_table

    layout = Dataset(out)
    entries: dict[str, dict] = {}
    rejects: list[dict] = []
    bins = [
        (ds, p)
        for ts, ds in zip(sets, dataset_ids, strict=True)
        for p in sorted(ts.rec_path.parent.glob("*.bin"))
    ]
    stems = [p.stem for _, p in bins]
    used = [p for _, p in bins]  # inputs whose hashes go into the manifest (+ sidecars actually joined)
    for dataset, path in bins:
        name = path.stem if stems.count(path.stem) == 1 else f"{dataset}-{path.stem}"
        images, issame = load_bin(path)
        folds = pair_folds(len(issame))
        extra = load_pair_degradation(path, len(issame))
        if validate:
            bad = [i for i, data in enumerate(images) if decode_or_none(data, max_pixels) is None]
            if bad and not skip_bad:
                raise DataError(f"undecodable image in pair {bad[0] // 2}", str(path), bad[0])
            drop = {i // 2 for i in bad}
            for i in bad:
                source = f"{dataset}/{escape_name(path.name)}"
                rejects.append({"source": source, "key": i, "reason": "undecodable image"})
            if drop:  # keep the original folds of the pairs that remain
                kept = np.array([p not in drop for p in range(len(issame))])
                images = [im for i, im in enumerate(images) if i // 2 not in drop]
                issame = [s for p, s in enumerate(issame) if p not in drop]
                folds = folds[kept]
                extra = {k: v[kept] for k, v in extra.items()}
        entry = write_pair_table(layout.pair_table_path(name), images, issame, folds=folds, extra=extra)
        entry["path"] = pair_table_relpath(name)
        entry["source"] = escape_name(str(path))  # strict UTF-8 JSON whatever the folder's bytes
        entry["dataset"] = dataset
        entries[name] = entry
        if extra:
            used.append(pair_sidecar_path(path))
    for stale in Path(layout.pairs_dir).glob("*.parquet"):  # pair tables of sources no longer given
        if stale.stem not in entries:
            stale.unlink()
    return entries, rejects, used
