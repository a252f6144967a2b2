"""Decode one encoded image straight into its slot of a batch.

The loader's decoders spend their time here, so the common case takes the shortest road: a JPEG of
the slot's size is decoded by libjpeg-turbo (through `simplejpeg`) directly into the slot's memory,
with no array allocated per image and no copy afterwards. It uses the accurate integer IDCT and
smooth chroma upsampling, the settings `cv2.imdecode` uses with the same library, so the pixels are
the ones cv2 gives (tests/unit/test_decode_into.py compares them over subsamplings, qualities,
progressive and grayscale files). bench/loader.py measures both decoders in the same run.

Everything else goes to `cv2.imdecode`, exactly as before: other formats (PNG, WebP …), a JPEG with
an EXIF segment (cv2 applies its orientation), CMYK, a JPEG of another size (resized into the slot),
and data libjpeg warns about (cv2 keeps what decodes of a truncated file). That path checks the
declared size first (`image_header.size_problem`): the shards may come from elsewhere than decode.
"""

from __future__ import annotations

import cv2
import numpy as np
import simplejpeg

from facepipe.data.formats.image_header import DEFAULT_MAX_PIXELS, size_problem

__all__ = ["decode_into"]

_APP0, _APP15, _COM, _APP1 = 0xE0, 0xEF, 0xFE, 0xE1


def _has_exif(data: memoryview) -> bool:
    """Whether an APP1 "Exif" segment comes before the frame header (cv2 would rotate by it)."""
    pos, end = 2, len(data) - 8
    while pos < end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if not (_APP0 <= marker <= _APP15 or marker == _COM):
            return False  # the application segments come first; past them no EXIF is read
        if marker == _APP1 and data[pos + 4 : pos + 8] == b"Exif":
            return True
        pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
    return False


def _simple_jpeg(payload: np.ndarray, slot: np.ndarray, rgb: bool) -> bool:
    """libjpeg-turbo into `slot`: True when it decoded an image of exactly the slot's shape."""
    data = memoryview(payload)
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8 or _has_exif(data):
        return False
    try:
        image = simplejpeg.decode_jpeg(payload, colorspace="RGB" if rgb else "BGR", buffer=slot)
    except ValueError:  # not a JPEG it takes (CMYK, corrupt data, larger than the slot …)
        return False
    return image.shape == slot.shape


def decode_into(
    payload: np.ndarray, slot: np.ndarray, rgb: bool, max_pixels: int = DEFAULT_MAX_PIXELS
) -> str | None:
    """Decode `payload` (uint8 bytes) into `slot` (uint8 H×W×3, C-contiguous) in RGB or BGR order,
    resized with INTER_AREA when the image has another size. Returns None, or why it did not decode.

    The fast path cannot overrun the slot; the general one first reads the declared size from the
    header, so an image declaring more than `max_pixels` is refused before anything is allocated."""
    if _simple_jpeg(payload, slot, rgb):
        return None
    problem = size_problem(payload.tobytes(), max_pixels) if len(payload) else ("empty", "empty payload")
    if problem is not None and problem[0] in ("too_large", "empty"):
        return problem[1]
    image = cv2.imdecode(payload, cv2.IMREAD_COLOR_RGB if rgb else cv2.IMREAD_COLOR)
    if image is None:
        return "image does not decode"
    if image.shape == slot.shape:
        slot[...] = image
    else:
        cv2.resize(image, (slot.shape[1], slot.shape[0]), dst=slot, interpolation=cv2.INTER_AREA)
    return None
