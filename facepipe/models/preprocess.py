"""The first operation of every training and embedding step: uint8 NHWC batch -> model input.

The loader and the decoders hand over uint8 NHWC images (a quarter of the bytes of float32, so the
host-to-device copy is 4x smaller); this turns them into the InsightFace normalisation
`(x - 127.5) / 128` as float32 NCHW on the device that runs the model, where the arithmetic is
nearly free. Every stage (backbone, heads' features, fine-tune, evaluation) calls this one function.
"""

from __future__ import annotations

from typing import Any

from facepipe.data.loader import MEAN, SCALE
from facepipe.errors import FacepipeError

__all__ = ["to_model_input"]


def to_model_input(images: Any, device: Any = None, memory_format: Any = None) -> Any:
    """uint8 NHWC tensor (or array) -> float32 `(x - 127.5) / 128`, NCHW shape, on `device`.

    `memory_format` defaults to channels-last (NCHW shape, NHWC strides: the layout the backbones
    train in, and what the uint8 batch already is, so no transpose copy). Bit-identical to
    `facepipe.data.loader.normalise_array` on CPU: x / 128 and 127.5 / 128 are exact in float32,
    and so is their difference.
    """
    import numpy as np
    import torch

    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise FacepipeError(
            f"model input must be uint8 NHWC images with 3 channels, not {images.dtype} {tuple(images.shape)}"
        )
    if device is not None:
        images = images.to(device, non_blocking=True)  # the copy goes over as uint8
    fmt = torch.channels_last if memory_format is None else memory_format
    # NHWC storage viewed as NCHW; the multiply makes the float tensor in that (channels-last) layout
    x = torch.mul(images.permute(0, 3, 1, 2), SCALE).sub_(MEAN * SCALE)
    return x.contiguous(memory_format=fmt)
