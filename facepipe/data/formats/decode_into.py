"""Decode encoded images straight into their slots of a batch.

The loader's decoders spend their time here, so the common case takes the shortest road. `decode_many`
hands a whole batch to a small C extension (`_jpeg_batch.c`, libjpeg-turbo) that decodes every plain
JPEG of the slot's size into its slot, and mirrors it where asked, with the GIL released once for the
batch: per-image decoders take the GIL back after every image, and on two busy cores those hand-overs
cost about a third of a decode (bench/loader.py measures both paths in the same run). What it leaves,
and everything where the extension was not built, goes through `decode_into` one image at a time.

`decode_into` decodes a JPEG of the slot's size with libjpeg-turbo (through `simplejpeg`) directly
into the slot's memory, with no array allocated per image and no copy afterwards. Both decoders use the
accurate integer IDCT and smooth chroma upsampling, the settings `cv2.imdecode` uses with the same
library, so the pixels are the ones cv2 gives (tests/unit/test_decode_into.py compares them over
subsamplings, qualities, progressive and grayscale files).

Everything else goes to `cv2.imdecode`, exactly as before: other formats (PNG, WebP …), a JPEG with
an EXIF segment (cv2 applies its orientation), CMYK, a JPEG of another size (resized into the slot),
and data libjpeg warns about (cv2 keeps what decodes of a truncated file). That path checks the
declared size first (`image_header.size_problem`): the shards may come from elsewhere than decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import simplejpeg

from facepipe.data.formats.image_header import DEFAULT_MAX_PIXELS, size_problem

try:  # built by `pip install -e .` where a C compiler and libjpeg's headers are (pyproject.toml)
    from facepipe.data.formats._jpeg_batch import decode_batch as _c_decode_batch
except ImportError:
    _c_decode_batch = None

__all__ = ["batch_decoder_built", "decode_into", "decode_many", "use_batch_decoder"]

_batch_enabled = True

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


def batch_decoder_built() -> bool:
    """Whether the C batch decoder was built (it needs a C compiler and libjpeg's headers)."""
    return _c_decode_batch is not None


def use_batch_decoder(enabled: bool) -> bool:
    """Turn the C batch decoder on or off for this process (bench/loader.py compares both); returns
    the previous setting. Pixels are the same either way."""
    global _batch_enabled
    previous, _batch_enabled = _batch_enabled, enabled
    return previous


def decode_many(
    sources: Sequence[np.ndarray],
    which: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    flips: np.ndarray,
    out: np.ndarray,
    rgb: bool,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, str] | None:
    """Decode image k, `sources[which[k]][starts[k]:ends[k]]`, into `out[k]` for every k (as
    `decode_into` would), mirrored left-right where `flips[k]`. `sources` are uint8 buffers (a batch's
    row groups): one call per batch, so the C decoder takes the GIL back once per batch. Returns None,
    or (k, why) for the first image that does not decode."""
    flips = np.ascontiguousarray(flips, dtype=bool)
    which, starts, ends = (np.ascontiguousarray(a, dtype=np.int64) for a in (which, starts, ends))
    todo: Any = range(len(starts))
    if _c_decode_batch is not None and _batch_enabled and out.flags.c_contiguous and len(starts):
        height, width = out.shape[1:3]
        spans = (list(sources), which, starts, ends)
        status = _c_decode_batch(*spans, flips.view(np.uint8), out, height, width, rgb)
        todo = np.flatnonzero(np.frombuffer(status, dtype=np.uint8)).tolist()
    source, first, last = which.tolist(), starts.tolist(), ends.tolist()
    for k in todo:
        problem = decode_into(sources[source[k]][first[k] : last[k]], out[k], rgb, max_pixels)
        if problem is not None:
            return k, problem
        if flips[k]:
            cv2.flip(out[k], 1, dst=out[k])
    return None
