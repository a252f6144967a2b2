"""Running a frozen backbone over images: embeddings, mirrored embeddings and the final conv map.

Training (verification after each epoch, the feature cache), evaluation, tracking's pyfunc and the
benchmarks all embed images the same way, so the one implementation lives here, below all of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from facepipe.data.shards import decode_images
from facepipe.errors import DataError
from facepipe.models.preprocess import to_model_input


def decode_images_of(
    images: list[bytes], size: tuple[int, int], color_order: str, source: str, first_row: int
) -> np.ndarray:
    """`decode_images`, with a failure reported against the file and row it came from."""
    try:
        return decode_images(images, color_order, size)
    except DataError as err:
        row = first_row + (err.record or 0)
        raise DataError(f"image refused: {err.message}", path=source, record=f"row {row}") from err


def _input_memory_format(backbone: Any) -> Any:
    """Channels-last when the model's convolutions are (such a model runs ~10% faster on NHWC input)."""
    import torch

    for p in backbone.parameters():
        if p.dim() == 4:
            nhwc = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return torch.channels_last if nhwc else torch.contiguous_format
    return torch.contiguous_format


@contextmanager
def eval_mode(backbone: Any) -> Iterator[Any]:
    """``backbone`` in eval mode inside the block, then back in the mode it had (a training loop's model)."""
    was_training = backbone.training
    backbone.eval()
    try:
        yield backbone
    finally:
        backbone.train(was_training)


def embed_images(backbone: Any, images_u8: np.ndarray, flip: bool = False, maps: bool = False) -> Any:
    """(embeddings, flipped embeddings or None, feature maps or None) for uint8 NHWC images."""
    import torch

    device = next(backbone.parameters()).device
    fmt = _input_memory_format(backbone)
    with torch.no_grad():
        x = to_model_input(images_u8, device, fmt)  # uint8 to the device, normalised there
        emb, fmap = backbone.forward_features(x)
        flipped = None
        if flip:
            flipped = backbone.forward_features(torch.flip(x, dims=[3]).contiguous(memory_format=fmt))[0]
    return (
        emb.float().cpu().numpy(),
        None if flipped is None else flipped.float().cpu().numpy(),
        fmap.float().cpu().numpy() if maps else None,
    )


def embed_pair_table(
    # the backbone and how it takes its images (size, colour order)
    backbone: Any, path: str | os.PathLike, input_size: tuple[int, int], color_order: str,
    batch_pairs: int = 128,
    flip: bool = True,
) -> dict[str, np.ndarray]:
    """Embeddings of a pair table, rows 2i / 2i+1 = pair i's images (the verification layout)."""
    import pyarrow.parquet as pq

    embs, flips, issame = [], [], []
    row = 0
    with eval_mode(backbone):
        handle = pq.ParquetFile(path)
        for batch in handle.iter_batches(batch_size=batch_pairs, columns=["image_a", "image_b", "issame"]):
            a = batch.column("image_a").to_pylist()
            b = batch.column("image_b").to_pylist()
            interleaved = [img for pair in zip(a, b, strict=True) for img in pair]
            images = decode_images_of(interleaved, input_size, color_order, str(path), 2 * row)
            e, f, _ = embed_images(backbone, images, flip=flip)
            embs.append(e)
            if f is not None:
                flips.append(f)
            issame.append(batch.column("issame").to_numpy(zero_copy_only=False))
            row += batch.num_rows
    return {
        "embedding": np.concatenate(embs),
        "flipped": np.concatenate(flips) if flips else None,
        "issame": np.concatenate(issame).astype(bool),
    }
