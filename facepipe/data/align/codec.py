"""Image bytes in and out of the align job: decode (shrinking huge JPEGs while decoding), encode crops.

OpenCV works in BGR; the encoded JPEG/PNG bytes are standard files that any reader decodes to RGB.
"""

from __future__ import annotations

import numpy as np

__all__ = ["decode_image", "jpeg_size", "decode_for_alignment", "encode_image"]


def decode_image(data: bytes, reduce: int = 1) -> np.ndarray | None:
    """Encoded bytes -> BGR uint8 HxWx3 (EXIF orientation applied), or None when OpenCV cannot decode.

    `reduce` in (1, 2, 4, 8) decodes a JPEG at that fraction of its size (libjpeg scales while decoding,
    several times faster than decoding in full and resizing).
    """
    import cv2

    if not data:
        return None
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}.get(
        reduce, cv2.IMREAD_REDUCED_COLOR_8
    )
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buffer, flag)
    except cv2.error:
        return None
    if image is None or image.ndim != 3 or image.shape[0] < 2 or image.shape[1] < 2:
        return None
    return image


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header without decoding; None when not a readable JPEG."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(data):
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return (width, height) if width and height else None
        if marker == 0xDA or length < 2:  # scan data starts: no frame header found before it
            return None
        pos += 2 + length
    return None


def decode_for_alignment(data: bytes, keep_side: int) -> tuple[np.ndarray | None, float]:
    """Decode, shrinking very large JPEGs while decoding; returns `(image, scale)` with `scale` the size
    of the decoded image relative to the file's (1.0 unless reduced).

    The reduction keeps the longest side at least `keep_side` (the detector's input size), so neither
    detection nor the warp source loses resolution that the pipeline would use.
    """
    size = jpeg_size(data)
    reduce = 1
    if size is not None:
        while reduce < 8 and max(size) / (reduce * 2) >= keep_side:
            reduce *= 2
    image = decode_image(data, reduce)
    if image is None or reduce == 1:
        return image, 1.0
    return image, max(image.shape[:2]) / max(size)


def encode_image(image: np.ndarray, fmt: str = "jpg", quality: int = 95) -> bytes:
    """BGR uint8 -> standard JPEG/PNG bytes (they decode to RGB in any ordinary reader)."""
    import cv2

    if fmt in ("jpg", "jpeg"):
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif fmt == "png":
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        raise ValueError(f"unknown image format {fmt!r} (jpg or png)")
    if not ok:
        raise RuntimeError("OpenCV failed to encode an aligned crop")
    return buf.tobytes()
