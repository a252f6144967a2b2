"""Verification pairs of aligned crops: read a pairs list, write OUT/pairs/<name>.parquet.

The tables use the decode stage's pair format (facepipe.data.shards.PAIR_SCHEMA), so training evaluates
them after each epoch exactly like the `.bin` pairs of a decoded dataset.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from facepipe.data.dataset import pair_table_relpath
from facepipe.data.formats.landmarks import normalise_key
from facepipe.data.shards import iter_shard_batches, write_pair_table
from facepipe.errors import DataError

__all__ = ["read_pairs_file", "write_pairs"]


def read_pairs_file(path: str | os.PathLike) -> list[tuple[str, str, bool]]:
    """`(path_a, path_b, issame)` in file order, paths relative to SRC. Two formats:

    - `path_a path_b 1|0` per line (tabs or spaces; `#` comments);
    - LFW `pairs.txt`: a `folds n` header, then `name i j` (same) and `name1 i name2 j` (different),
      meaning `name/name_000i.jpg`.
    """
    pairs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read pairs file: {err}", path=str(path)) from err
    for lineno, line in enumerate(lines, start=1):
        fields = line.split("#", 1)[0].split()
        if not fields or (lineno == 1 and len(fields) == 2 and all(f.isdigit() for f in fields)):
            continue
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            name, i, j = fields
            pairs.append((f"{name}/{name}_{int(i):04d}.jpg", f"{name}/{name}_{int(j):04d}.jpg", True))
        elif len(fields) == 4 and fields[1].isdigit() and fields[3].isdigit():
            a, i, b, j = fields
            pairs.append((f"{a}/{a}_{int(i):04d}.jpg", f"{b}/{b}_{int(j):04d}.jpg", False))
        elif len(fields) == 3 and fields[2] in ("0", "1"):
            pairs.append((fields[0], fields[1], fields[2] == "1"))
        else:
            raise DataError(
                "expected 'path_a path_b 0|1' or an LFW pairs line", path=str(path), record=lineno
            )
    return pairs


def write_pairs(
    shard_paths: Sequence[str | os.PathLike], pairs_file: str | os.PathLike, out_dir: str | os.PathLike
) -> dict:
    """Write OUT/pairs/<stem>.parquet from the aligned crops; pairs with an image that was not aligned
    (rejected, or absent from SRC) are left out and counted in the returned entry."""
    pairs = [(normalise_key(a), normalise_key(b), same) for a, b, same in read_pairs_file(pairs_file)]
    wanted = {p for a, b, _ in pairs for p in (a, b)}
    crops: dict[str, bytes] = {}  # only the images the pairs name
    for batch in iter_shard_batches(shard_paths, columns=["source_path", "image"]):
        for source, image in zip(batch.column("source_path").to_pylist(), batch.column("image"), strict=True):
            if source in wanted:
                crops[source] = image.as_py()
    kept = [(a, b, same) for a, b, same in pairs if a in crops and b in crops]
    images = [crops[p] for a, b, _ in kept for p in (a, b)]
    name = Path(pairs_file).stem
    entry = write_pair_table(Path(out_dir) / f"{name}.parquet", images, [same for *_, same in kept])
    entry["path"] = pair_table_relpath(name)
    entry["listed"] = len(pairs)
    entry["left_out"] = len(pairs) - len(kept)  # an image of the pair was rejected or is not in SRC
    return entry
