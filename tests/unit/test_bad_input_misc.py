"""Bad input outside decode/align proper (issue 18): `.bin` arrays without their data, damaged `.npz` given
to `facepipe evaluate`, image headers read without decoding, and no user-facing traceback anywhere."""

from __future__ import annotations

import argparse
import io
import struct
import zipfile

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facepipe import cli
from facepipe.cli import main
from facepipe.data.formats.image_header import image_format, image_size, size_problem
from facepipe.data.formats.verification_bin import load_bin, write_bin
from facepipe.errors import DataError

# ------------------------------------------------------------------ 6. no uninitialised memory from .bin


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)  # BININT


def _array_without_data(construct: str, n: int, module: str) -> bytes:
    """Pickle ops building one uint8 array of n elements whose data the pickle never gives."""
    if construct == "reconstruct":  # numpy's own recipe, with the BUILD (the data) left out
        return _global(module, "_reconstruct") + _global("numpy", "ndarray") + _int(n) + b"\x85C\x01B\x87R"
    return _global("numpy", "ndarray") + b"(" + _int(n) + b"\x85X\x02\x00\x00\x00u1tR"  # ndarray((n,), "u1")


def _bin_pickle(first: bytes, second: bytes) -> bytes:
    """(bins, issame) = ([first, second], [True]) as protocol-3 pickle bytes."""
    return b"\x80\x03(]" + first + b"a" + second + b"a]\x88at."


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 1 << 24),
    construct=st.sampled_from(["reconstruct", "ndarray"]),
    module=st.sampled_from(["numpy.core.multiarray", "numpy._core.multiarray"]),
)
def test_bin_arrays_declared_without_data_are_refused(tmp_path_factory, n, construct, module):
    path = tmp_path_factory.mktemp("bin") / "evil.bin"
    good = np.frombuffer(b"\xff\xd8\xff", dtype=np.uint8)
    legit = io.BytesIO()
    import pickle

    pickle.Pickler(legit, protocol=3).dump(good)
    path.write_bytes(_bin_pickle(legit.getvalue()[2:-1], _array_without_data(construct, n, module)))
    with pytest.raises(
        DataError, match=r"declared.*(without|before) its data.*uninitialised memory.*evil\.bin"
    ):
        load_bin(path)


def test_bin_with_real_arrays_still_loads(tmp_path):
    import pickle

    images = [np.frombuffer(bytes([i]) * 7, dtype=np.uint8) for i in range(4)]
    for protocol in (3, 5):
        path = tmp_path / f"p{protocol}.bin"
        path.write_bytes(pickle.dumps((images, [True, False]), protocol=protocol))
        assert load_bin(path) == ([bytes([i]) * 7 for i in range(4)], [True, False])
    write_bin(tmp_path / "b.bin", [b"ab", b"cd"], [True])
    assert load_bin(tmp_path / "b.bin") == ([b"ab", b"cd"], [True])


# ------------------------------------------------------------------- 5. evaluate names the damaged .npz


def _templates_npz(path) -> bytes:
    rng = np.random.default_rng(0)
    np.savez(
        path, embeddings=rng.normal(size=(8, 4)), templates=np.arange(8) // 2, medias=np.arange(8),
        p1=np.array([0, 1]), p2=np.array([2, 3]), label=np.array([1, 0]),
    )  # fmt: skip
    return path.read_bytes()


def _npz_declaring_more_than_it_holds(path) -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (10**9, 4)}
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("embeddings.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"\0" * 64)


@pytest.mark.parametrize("damage", ["truncated", "not_zip", "declared_too_large"])
@pytest.mark.parametrize("option", ["--templates", "--features"])
def test_evaluate_names_a_damaged_npz_without_traceback(tmp_path, capsys, damage, option):
    path = tmp_path / "input.npz"
    data = _templates_npz(path)
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "not_zip":
        path.write_bytes(b"just some text\n" * 10)
    else:
        _npz_declaring_more_than_it_holds(path)
    assert main(["evaluate", option, str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    if damage == "declared_too_large":
        assert "declares shape (1000000000, 4)" in err


# -------------------------------------------------------------- 8. image type and size from the header


def _encode(kind: str, width: int, height: int) -> bytes:
    pixels = np.random.default_rng(width * 7 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == "gif":
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "GIF")
        return buffer.getvalue()
    extension = {"jpeg": ".jpg", "pnm": ".ppm", "webp_lossless": ".webp"}.get(kind, f".{kind}")
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if kind == "webp_lossless" else []
    return cv2.imencode(extension, pixels, params)[1].tobytes()


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["jpeg", "png", "gif", "bmp", "webp", "webp_lossless", "tiff", "pnm"]),
    width=st.integers(1, 300),
    height=st.integers(1, 300),
)
def test_header_size_matches_the_decoded_image(kind, width, height):
    data = _encode(kind, width, height)
    assert image_format(data) == kind.removesuffix("_lossless")
    assert image_size(data) == (width, height)
    assert size_problem(data, max_pixels=width * height) is None
    assert size_problem(data, max_pixels=width * height - 1)[0] == "too_large" or width * height == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_header_reading_never_raises_on_junk(data):
    size = image_size(data)
    assert size is None or len(size) == 2
    assert size_problem(data) is None or size_problem(data)[0] in ("not_an_image", "no_size", "too_large")


# ------------------------------------------------------------------------- 9. no user-facing traceback


def _parser_raising(monkeypatch, error: BaseException) -> None:
    def boom(args):
        raise error

    parser = argparse.ArgumentParser()
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(func=boom, command="decode")
    monkeypatch.setattr(cli, "build_parser", lambda: parser)


@pytest.mark.parametrize(
    ("error", "code", "expected"),
    [
        (RuntimeError("worker state lost"), 1, "RuntimeError: worker state lost; run again with -v"),
        (FileNotFoundError(2, "No such file or directory", "/data/x.rec"), 1, "(file /data/x.rec)"),
        (MemoryError(), 1, "out of memory"),
        (KeyboardInterrupt(), 130, "interrupted; run the same command again to resume"),
        (DataError("bad magic", "a.rec", 3), 2, "bad magic (file a.rec, record 3)"),
    ],
)
def test_every_error_ends_in_one_line_and_exit_code(monkeypatch, capsys, caplog, error, code, expected):
    _parser_raising(monkeypatch, error)
    assert main([]) == code
    err = capsys.readouterr().err
    assert err.startswith("facepipe decode: error: ") and expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + caplog.text


def test_verbose_keeps_the_traceback(monkeypatch, capsys, caplog):
    _parser_raising(monkeypatch, RuntimeError("worker state lost"))
    assert main(["-v"]) == 1
    assert "RuntimeError: worker state lost" in capsys.readouterr().err
    assert "Traceback" in caplog.text and "in boom" in caplog.text


# ------------------------------------------- 8. evaluation's images: refused from the header, never decoded


def test_evaluation_refuses_a_pixel_bomb_before_decoding(monkeypatch):
    """Evaluation and the feature cache embed pair-table images through `decode_images_of`: a 30000x30000
    PNG header is refused by size (file and row named), and cv2 never sees its bytes."""
    from facepipe.models.embed import decode_images_of
    from tests.unit.test_bad_input_decode import png_header_only

    good = cv2.imencode(".jpg", np.full((12, 12, 3), 90, np.uint8))[1].tobytes()
    bomb = png_header_only(30000, 30000)
    decoded = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: decoded.append(len(buf)) or real(buf, flags))
    with pytest.raises(DataError, match=r"30000x30000 = 900000000 pixels.*file pairs/lfw\.parquet.*row 41"):
        decode_images_of([good, bomb, good], (12, 12), "RGB", "pairs/lfw.parquet", first_row=40)
    assert decoded == [len(good)]
    # an ordinary undecodable image still names the file and row, with what went wrong
    with pytest.raises(DataError, match=r"image refused: undecodable image.*row 42"):
        decode_images_of([good, good, b"\xff\xd8junk"], (12, 12), "RGB", "pairs/lfw.parquet", first_row=40)
