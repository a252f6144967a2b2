"""A contact sheet: a PNG grid of aligned crops with the template points, to check alignment by eye.

On a good alignment the green dots sit on the eyes, the nose tip and the mouth corners, the eyes are level
and the face is centred. `facepipe align` writes one as OUT/contact_sheet.png (a report artefact).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from facepipe.data.align.codec import decode_image
from facepipe.data.align.geometry import Template, get_template
from facepipe.data.shards import iter_shard_batches
from facepipe.fsutil import write_bytes_atomic

__all__ = ["write_contact_sheet"]


def write_contact_sheet(
    shard_paths: Sequence[str | os.PathLike],
    path: str | os.PathLike,
    max_faces: int = 100,
    template: Template | str | None = None,
    scale: int | None = None,
) -> int:
    """Write a PNG grid of up to `max_faces` crops spread evenly over the shards; returns how many.

    Green dots mark the template points: on a good alignment they sit on the eyes, nose tip and mouth
    corners. `scale` defaults to 2 for small sheets and 1 above 64 faces (keeps the PNG a few MB).
    """
    import cv2
    import pyarrow.parquet as pq

    total = sum(pq.read_metadata(p).num_rows for p in shard_paths)
    if total == 0:
        return 0
    wanted = set(np.linspace(0, total - 1, min(max_faces, total)).round().astype(int).tolist())
    tiles, captions = [], []
    index = 0
    for batch in iter_shard_batches(shard_paths, columns=["image", "source_path", "label"]):
        data = batch.to_pydict()
        for image, source, label in zip(data["image"], data["source_path"], data["label"], strict=True):
            if index in wanted:
                pixels = decode_image(image)
                if pixels is not None:
                    tiles.append(pixels)
                    name = (source or "").split("/")[0] or str(label)
                    captions.append(f"{label}:{name}")
            index += 1
    if not tiles:
        return 0
    if isinstance(template, str):
        template = get_template(template)
    height, width = tiles[0].shape[:2]
    scale = scale or (2 if len(tiles) <= 64 else 1)
    cell_w, cell_h, caption_h = width * scale, height * scale, 18
    cols = int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / cols))
    sheet = np.full((rows * (cell_h + caption_h), cols * cell_w, 3), 255, np.uint8)
    for i, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        r, c = divmod(i, cols)
        y0, x0 = r * (cell_h + caption_h), c * cell_w
        big = cv2.resize(tile, (cell_w, cell_h), interpolation=cv2.INTER_LINEAR)
        if template is not None and tile.shape[:2] == template.size:
            for x, y in template.points:  # where the landmarks should be
                cv2.circle(big, (round(x * scale), round(y * scale)), scale, (0, 255, 0), -1, cv2.LINE_AA)
        sheet[y0 : y0 + cell_h, x0 : x0 + cell_w] = big
        cv2.putText(
            sheet,
            caption[: max(4, cell_w // (8 if scale > 1 else 6))],
            (x0 + 2, y0 + cell_h + 13),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4 if scale > 1 else 0.3,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    ok, buf = cv2.imencode(".png", sheet)
    if not ok:
        raise RuntimeError("OpenCV failed to encode the contact sheet")
    write_bytes_atomic(path, buf.tobytes())
    return len(tiles)
