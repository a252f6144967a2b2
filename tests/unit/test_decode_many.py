"""decode_many (the loader's batch path) gives cv2.imdecode's pixels, mirrored where asked, whether
the C batch decoder or the image-by-image path took each image; it never crashes on bad spans."""

from __future__ import annotations

import concurrent.futures as cf
import io
import os
import platform
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from facepipe.data.formats import decode_into as module
from facepipe.data.formats.decode_into import decode_many, use_batch_decoder
from tests.unit.test_decode_into import _exif_jpeg, _face_like, _jpegs, _reference

needs_c = pytest.mark.skipif(
    not module.batch_decoder_built() and os.environ.get("CI") != "true",
    reason="the C batch decoder was not built (no C compiler or libjpeg headers here)",
)


def _cmyk_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(_face_like(4)).convert("CMYK").save(buffer, "JPEG")
    return buffer.getvalue()


def _cases() -> dict[str, bytes]:
    cases = _jpegs() | {"exif-rotated": _exif_jpeg(6), "exif-upright": _exif_jpeg(1), "cmyk": _cmyk_jpeg()}
    cases["png"] = cv2.imencode(".png", _face_like(5))[1].tobytes()
    whole = cases["420-q95"]
    cases["truncated"] = whole[: len(whole) * 2 // 3]
    cases["after-the-end"] = whole + b"\x00" * 64  # bytes after EOI: libjpeg never reads them
    cases["junk-before-the-end"] = whole[:-2] + b"\x00" * 8 + whole[-2:]  # libjpeg warns
    return cases


Column = tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]  # sources, which, starts, ends


def _column(payloads: list[bytes], groups: int = 1) -> Column:
    """The loader's view of a batch: `groups` row groups' data buffers (the payloads dealt out round
    robin, so consecutive images come from different buffers) and each payload's (buffer, start, end)."""
    sources, which, starts, ends = [], [], [], []
    for g in range(groups):
        mine = payloads[g::groups]
        lengths = np.array([len(p) for p in mine], dtype=np.int64)
        sources.append(np.frombuffer(b"".join(mine), np.uint8))
        starts.append(np.cumsum(lengths) - lengths)
        ends.append(np.cumsum(lengths))
    order = np.argsort(np.concatenate([np.arange(g, len(payloads), groups) for g in range(groups)]))
    which = np.concatenate([np.full(len(s), g) for g, s in enumerate(starts)])[order]
    return sources, which, np.concatenate(starts)[order], np.concatenate(ends)[order]


def _expected(payload: bytes, shape: tuple[int, int, int], rgb: bool, flip: bool) -> np.ndarray | None:
    image = _reference(np.frombuffer(payload, np.uint8), shape, rgb)
    return cv2.flip(image, 1) if flip and image is not None else image


def test_the_batch_decoder_is_built():
    """Under CI the extension must be there (install-system-deps.sh puts its headers in place): else
    the parity tests below would only compare the Python path with itself."""
    if os.environ.get("CI") != "true" and not module.batch_decoder_built():
        pytest.skip("the C batch decoder was not built here (no C compiler or libjpeg headers)")
    assert module.batch_decoder_built()


@needs_c
@pytest.mark.parametrize("batch", [True, False], ids=["c-batch", "image-by-image"])
@pytest.mark.parametrize("rgb", [True, False])
@pytest.mark.parametrize("shape", [(112, 112, 3), (96, 80, 3)])  # the images' own size, and a resize
def test_same_pixels_as_cv2_mirrored_where_asked(batch, rgb, shape):
    cases = {k: v for k, v in _cases().items() if _expected(v, shape, rgb, False) is not None}
    column = _column(list(cases.values()), groups=3)
    flips = np.arange(len(cases)) % 2 == 1
    out = np.full((len(cases), *shape), 7, np.uint8)
    previous = use_batch_decoder(batch)
    try:
        assert decode_many(*column, flips, out, rgb) is None
    finally:
        use_batch_decoder(previous)
    for k, (name, payload) in enumerate(cases.items()):
        assert np.array_equal(out[k], _expected(payload, shape, rgb, bool(flips[k]))), name


@needs_c
def test_the_c_decoder_takes_plain_jpegs_and_leaves_the_rest():
    """Not a test of speed: the plain JPEGs really went through C (else the parity test compares the
    Python path with itself), and EXIF, CMYK, PNG, other sizes and damaged data were left to cv2."""
    cases = _cases()
    column = _column(list(cases.values()), groups=2)
    out = np.empty((len(cases), 112, 112, 3), np.uint8)
    status = module._c_decode_batch(*column, np.zeros(len(cases), np.uint8), out, 112, 112, True)
    left = {name for name, code in zip(cases, status, strict=True) if code}
    plain = set(_jpegs()) - {"odd-size"} | {"after-the-end"}
    assert left == set(cases) - plain


@needs_c
def test_bad_spans_and_buffers_are_refused_without_touching_memory():
    payload = _jpegs()["420-q75"]
    sources, which, starts, ends = _column([payload])
    out = np.full((1, 112, 112, 3), 9, np.uint8)
    flip = np.zeros(1, np.uint8)
    spans = ((0, 0, len(payload) + 1), (0, -1, 10), (0, 20, 10), (0, len(payload) + 5, len(payload) + 9),
             (1, 0, 10), (-1, 0, 10))  # fmt: skip
    for s, a, b in spans:
        span = np.array([s], np.int64), np.array([a], np.int64), np.array([b], np.int64)
        assert module._c_decode_batch(sources, *span, flip, out, 112, 112, True) == b"\x01", (s, a, b)
    assert (out == 9).all()
    column = (sources, which, starts, ends)
    with pytest.raises(ValueError, match="out holds"):
        module._c_decode_batch(*column, flip, out[:, :56], 112, 112, True)
    with pytest.raises(ValueError, match="8 bytes per image"):
        module._c_decode_batch(sources, which, starts.astype(np.int32), ends, flip, out, 112, 112, True)
    with pytest.raises(ValueError, match="1..65500"):
        module._c_decode_batch(*column, flip, out, 0, 112, True)
    with pytest.raises(ValueError, match="not C-contiguous"):
        module._c_decode_batch(*column, flip, out[:, ::-1], 112, 112, True)
    with pytest.raises(BufferError, match="not writable"):
        module._c_decode_batch(*column, flip, bytes(out.size), 112, 112, True)
    with pytest.raises(TypeError, match="list of byte buffers"):
        module._c_decode_batch(None, which, starts, ends, flip, out, 112, 112, True)


def test_the_first_image_that_does_not_decode_is_named_and_the_ones_before_are_decoded():
    good = _jpegs()["444-q95"]
    out = np.empty((5, 112, 112, 3), np.uint8)
    k, why = decode_many(*_column([good, good, b"no image", good, b""], 2), np.zeros(5, bool), out, False)
    assert k == 2 and why == "image does not decode"
    assert np.array_equal(out[1], _expected(good, (112, 112, 3), False, False))
    assert decode_many(*_column([good, b""]), np.zeros(2, bool), out[:2], False) == (1, "empty payload")


@needs_c
def test_threads_decoding_at_once_get_the_same_pixels():
    payloads = list(_jpegs().values()) * 8
    sources, which, starts, ends = _column(payloads, groups=3)
    flips = np.arange(len(payloads)) % 3 == 0
    one = np.empty((len(payloads), 112, 112, 3), np.uint8)
    assert decode_many(sources, which, starts, ends, flips, one, True) is None
    many = np.empty_like(one)
    parts = np.array_split(np.arange(len(payloads)), 4)

    def part(p: np.ndarray) -> tuple[int, str] | None:
        return decode_many(sources, which[p], starts[p], ends[p], flips[p], many[p[0] : p[-1] + 1], True)

    with cf.ThreadPoolExecutor(4) as pool:
        results = pool.map(part, parts)
        assert list(results) == [None] * 4
    assert np.array_equal(one, many)


@needs_c
def test_real_photos_in_one_batch_per_size(faces_dir: Path):
    """The fixture's photos (phone and web JPEGs, some with EXIF, a few PNGs), mirrored and not,
    each in a batch of its own size and all together at 112×112."""
    files = sorted(p for p in (faces_dir / "images").rglob("*") if p.is_file())
    assert files
    payloads = [p.read_bytes() for p in files]
    flips = np.arange(len(files)) % 2 == 0
    for k, payload in enumerate(payloads):
        shape = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR).shape
        out = np.empty((1, *shape), np.uint8)
        assert decode_many(*_column([payload]), flips[k : k + 1], out, True) is None, files[k]
        assert np.array_equal(out[0], _expected(payload, shape, True, bool(flips[k]))), files[k]
    out = np.empty((len(files), 112, 112, 3), np.uint8)
    assert decode_many(*_column(payloads, groups=4), flips, out, False) is None
    for k, payload in enumerate(payloads):
        assert np.array_equal(out[k], _expected(payload, (112, 112, 3), False, bool(flips[k]))), files[k]


_MIRROR_CHECK = """
import cv2, numpy as np
from facepipe.data.formats import _jpeg_batch
from tests.unit.test_decode_many import _column
widths = [*range(1, 41), 111, 112, 113, 250]
failed = []
for w in widths:
    rng = np.random.default_rng(w)
    image = cv2.GaussianBlur(rng.integers(0, 256, (9, w, 3), dtype=np.uint8), (0, 0), 1)
    payload = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    # the batch sits at the end of a larger buffer: a write past its last row would hit the guard
    memory = np.full(2 * 9 * w * 3 + 64, 77, np.uint8)
    out = memory[: 2 * 9 * w * 3].reshape(2, 9, w, 3)
    flips = np.array([1, 1], np.uint8)
    status = _jpeg_batch.decode_batch(*_column([payload, payload]), flips, out, 9, w, False)
    want = cv2.flip(cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR), 1)
    if status != bytes(2) or not (out == want).all() or not (memory[out.size :] == 77).all():
        failed.append(w)
print(_jpeg_batch.SIMD_MIRROR, failed)
"""


@needs_c
@pytest.mark.parametrize("plain", ["0", "1"], ids=["simd", "plain-loop"])
def test_mirrored_rows_of_every_width_match_cv2_flip(plain):
    """The mirror's vector steps (five pixels) and the plain loop after them, across widths around
    the step and the row end, with nothing written past the batch. Each path runs in a process of its
    own: which one the module takes is fixed at import."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "FACEPIPE_PLAIN_MIRROR": plain}
    run = subprocess.run(
        [sys.executable, "-c", _MIRROR_CHECK], cwd=root, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    simd, failed = run.stdout.split(maxsplit=1)
    assert failed.strip() == "[]"
    assert simd == ("1" if plain == "0" and platform.machine() in ("x86_64", "AMD64", "i686") else "0")
