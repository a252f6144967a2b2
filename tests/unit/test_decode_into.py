"""decode_into gives the pixels cv2.imdecode gives, whichever decoder took the image."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facepipe.data.formats import decode_into as module
from facepipe.data.formats.decode_into import decode_into


def _reference(payload: np.ndarray, shape: tuple[int, int, int], rgb: bool) -> np.ndarray | None:
    """Today's loader path: cv2.imdecode in the wanted order, resized with INTER_AREA when needed."""
    image = cv2.imdecode(payload, cv2.IMREAD_COLOR_RGB if rgb else cv2.IMREAD_COLOR)
    if image is None or image.shape == shape:
        return image
    return cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def _face_like(seed: int, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 1.5 + seed % 3)


def _jpegs() -> dict[str, bytes]:
    """JPEGs of the kinds face datasets hold: every subsampling, low and high quality, progressive,
    optimised Huffman tables, grayscale, restart markers."""
    out = {}
    for i, (sampling, name) in enumerate(((cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, "444"),
                                          (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422, "422"),
                                          (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, "420"))):  # fmt: skip
        for quality in (35, 75, 95):
            params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling]
            image = _face_like(i * 10 + quality)
            out[f"{name}-q{quality}"] = cv2.imencode(".jpg", image, params)[1].tobytes()
    image = _face_like(7)
    out["progressive"] = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    out["optimised"] = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_OPTIMIZE, 1])[1].tobytes()
    out["restarts"] = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_RST_INTERVAL, 4])[1].tobytes()
    out["grayscale"] = cv2.imencode(".jpg", image[..., 1])[1].tobytes()
    out["odd-size"] = cv2.imencode(".jpg", _face_like(3, (113, 97)))[1].tobytes()
    return out


def _exif_jpeg(orientation: int) -> bytes:
    """A JPEG whose APP1 EXIF segment says `orientation` (cv2 turns the image by it)."""
    body = cv2.imencode(".jpg", _face_like(11, (112, 96)))[1].tobytes()
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01"
    tiff += orientation.to_bytes(2, "big") + b"\x00\x00" + b"\x00\x00\x00\x00"
    segment = b"Exif\x00\x00" + tiff
    return body[:2] + b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment + body[2:]


@pytest.mark.parametrize("rgb", [True, False])
@pytest.mark.parametrize("shape", [(112, 112, 3), (96, 80, 3)])  # the image's own size, and a resize
def test_same_pixels_as_cv2(rgb, shape):
    cases = _jpegs() | {"exif-rotated": _exif_jpeg(6), "exif-upright": _exif_jpeg(1)}
    cases["png"] = cv2.imencode(".png", _face_like(5))[1].tobytes()
    for name, data in cases.items():
        payload = np.frombuffer(data, np.uint8)
        slot = np.full(shape, 7, np.uint8)
        assert decode_into(payload, slot, rgb) is None, name
        assert np.array_equal(slot, _reference(payload, shape, rgb)), name


def test_the_fast_path_takes_plain_jpegs_and_leaves_the_rest_to_cv2():
    """Not a test of speed: that the JPEGs above really went through libjpeg-turbo directly (else the
    parity test would only compare cv2 with itself), and the EXIF, PNG and other-size ones did not."""
    slot = np.empty((112, 112, 3), np.uint8)
    for name, data in _jpegs().items():
        assert module._simple_jpeg(np.frombuffer(data, np.uint8), slot, True) == (name != "odd-size"), name
    for data in (_exif_jpeg(6), cv2.imencode(".png", _face_like(5))[1].tobytes()):
        assert not module._simple_jpeg(np.frombuffer(data, np.uint8), slot, True)


def test_bad_payloads_do_not_decode_and_a_truncated_jpeg_decodes_as_cv2_does():
    slot = np.empty((112, 112, 3), np.uint8)
    for bad in (b"", b"\xff\xd8", b"\xff\xd8\xff\xe0\x00\x10JFIF", bytes(500), b"not an image at all"):
        assert decode_into(np.frombuffer(bad, np.uint8), slot, True) is not None, bad[:12]
    whole = _jpegs()["420-q95"]
    truncated = np.frombuffer(whole[: len(whole) * 2 // 3], np.uint8)
    expected = _reference(truncated, slot.shape, True)
    assert (decode_into(truncated, slot, True) is None) == (expected is not None)
    if expected is not None:
        assert np.array_equal(slot, expected)


def test_real_photos(faces_dir: Path):
    """The fixture's photos (phone and web JPEGs, some with EXIF, a few PNGs), each into a slot of its
    own size and into a 112×112 one."""
    files = sorted(p for p in (faces_dir / "images").rglob("*") if p.is_file())
    assert files
    for path in files:
        payload = np.frombuffer(path.read_bytes(), np.uint8)
        own = cv2.imdecode(payload, cv2.IMREAD_COLOR)
        for shape in (own.shape, (112, 112, 3)):
            slot = np.empty(shape, np.uint8)
            assert decode_into(payload, slot, True) is None, path
            assert np.array_equal(slot, _reference(payload, shape, True)), path


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding():
    """A PNG and a JPEG whose headers declare 30000×30000 ("pixel bombs"): refused with the declared
    size, and the slot is not touched."""
    png = bytearray(cv2.imencode(".png", _face_like(2, (8, 8)))[1].tobytes())
    png[16:24] = (30000).to_bytes(4, "big") + (30000).to_bytes(4, "big")  # IHDR width, height
    jpeg = bytearray(cv2.imencode(".jpg", _face_like(2, (8, 8)))[1].tobytes())
    sof = jpeg.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    jpeg[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big")
    for bomb in (png, jpeg):
        slot = np.full((112, 112, 3), 9, np.uint8)
        problem = decode_into(np.frombuffer(bytes(bomb), np.uint8), slot, True, max_pixels=10_000_000)
        assert problem is not None and "30000x30000" in problem
        assert (slot == 9).all()
