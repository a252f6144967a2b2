"""Verification `.bin` files: the four known variants, round trips, and hostile pickles refused unrun."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import subprocess
import warnings

import cv2
import numpy as np
import pytest

from facepipe.data.formats.verification_bin import RestrictedUnpickler, load_bin, write_bin
from facepipe.data.shards import decode_images
from facepipe.errors import DataError

VARIANTS = [
    "tiny_val.bin",
    "tiny_val_py3_bytes_p4.bin",
    "tiny_val_py3_ndarray_p3.bin",
    "tiny_val_py3_ndarray_p5.bin",
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fixture_variants(recordio_dir, variant):
    exp = json.loads((recordio_dir / "tiny_val.expected.json").read_text())
    path = recordio_dir / variant
    facts = exp["variants"][variant]
    raw = path.read_bytes()
    assert len(raw) == facts["size"] and hashlib.sha256(raw).hexdigest() == facts["sha256"]
    assert raw[:16].hex() == facts["first_16_bytes_hex"]
    images, issame = load_bin(path)
    assert issame == exp["issame_list"] and len(issame) == exp["num_pairs"]
    assert all(type(v) is bool for v in issame)
    assert len(images) == exp["num_images"] and all(type(im) is bytes for im in images)
    for image, facts_i in zip(images, exp["images"], strict=True):
        assert len(image) == facts_i["payload_length"]
        assert hashlib.sha256(image).hexdigest() == facts_i["payload_sha256"]
    for facts_i in exp["images"]:
        image = images[facts_i["index"]]
        assert facts_i["pair"] == facts_i["index"] // 2
        assert facts_i["payload_kind"] == ("jpeg" if image[:2] == b"\xff\xd8" else "bytes")
        pixels = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
        assert list(pixels.shape) == facts_i["decoded_shape_hwc"]
        np.testing.assert_allclose(pixels.reshape(-1, 3).mean(0), facts_i["decoded_mean_bgr"], atol=1.0)
        if hashlib.sha256(pixels.tobytes()).hexdigest() != facts_i["decoded_bgr_sha256_cv2"]:
            warnings.warn(f"image {facts_i['index']}: pixels differ from cv2 4.10's", stacklevel=1)
        if facts_i["mx_imdecode_rgb_equals_cv2_bgr_reversed"]:
            np.testing.assert_array_equal(decode_images([image], "RGB")[0], pixels[..., ::-1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_fixture_pickle_facts(recordio_dir, variant):
    """Protocol, opcodes, globals and element types of each variant, as the fixture notes them."""
    facts = json.loads((recordio_dir / "tiny_val.expected.json").read_text())["variants"][variant]
    raw = (recordio_dir / variant).read_bytes()
    assert raw[0] == 0x80 and raw[1] == facts["pickle_protocol"]
    assert sorted({op.name for op, _, _ in pickletools.genops(raw)}) == facts["pickle_opcodes_used"]
    resolved = []

    class Recording(RestrictedUnpickler):
        def find_class(self, module, name):
            resolved.append(f"{module}.{name}")
            return super().find_class(module, name)

    encoding = "bytes" if facts["pickle_protocol"] == 2 else "ASCII"
    bins, _ = Recording(io.BytesIO(raw), encoding=encoding).load()
    assert sorted(set(resolved)) == facts["pickle_globals_resolved"]
    assert type(bins[0]).__name__ == facts["bins_python_type_after_load"]
    if facts["bins_shape"] is not None:
        assert list(bins[0].shape) == facts["bins_shape"] and bins[0].dtype == np.uint8


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_write_round_trip(tmp_path, protocol):
    images = [bytes([i]) * (i + 1) for i in range(6)]
    issame = [True, False, True]
    write_bin(tmp_path / "v.bin", images, issame, protocol=protocol)
    assert load_bin(tmp_path / "v.bin") == (images, issame)
    with pytest.raises(ValueError):
        write_bin(tmp_path / "w.bin", images[:5], issame)


def test_python3_protocol_2_is_not_written():
    """Python 3 pickles bytes at protocol 2 through _codecs.encode, a global the loader does not admit."""
    with pytest.raises(ValueError, match="protocol"):
        write_bin("unused.bin", [b"a", b"b"], [True], protocol=2)


def test_numpy_pickles_as_written_today(tmp_path):
    """numpy >= 2 pickles arrays through numpy._core names; those load too."""
    arrays = [np.frombuffer(b"\xff\xd8abc", np.uint8).copy(), np.frombuffer(b"xy", np.uint8).reshape(2, 1)]
    for protocol in (3, 5):
        (tmp_path / "n.bin").write_bytes(pickle.dumps((arrays, [True]), protocol=protocol))
        assert load_bin(tmp_path / "n.bin") == ([b"\xff\xd8abc", b"xy"], [True])


# --------------------------------------------------------------------------------------- hostile input


class _Call:
    """Pickles as a call of `func(*args)` on load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile_payloads(marker):
    touch = f"touch {marker}"
    return {
        "os.system": pickle.dumps(([_Call(os.system, touch)], []), protocol=2),
        "builtins.eval": pickle.dumps(_Call(eval, f"open({str(marker)!r}, 'w').close()"), protocol=4),
        "builtins.exec": pickle.dumps(_Call(exec, f"open({str(marker)!r}, 'w').close()"), protocol=5),
        "subprocess.check_call": pickle.dumps(
            _Call(subprocess.check_call, ["touch", str(marker)]), protocol=3
        ),
        # hand-written protocol-0 GLOBAL opcode, as an attacker would write it
        "os.system (GLOBAL)": b"cos\nsystem\n(S'" + touch.encode() + b"'\ntR.",
        # inside an otherwise valid (bins, issame) pair, next to a real numpy array
        "nested": pickle.dumps(([np.zeros(3, np.uint8), _Call(os.system, touch)], [True]), protocol=5),
        "builtins.getattr": pickle.dumps(_Call(getattr, 0, "real"), protocol=4),
        "numpy.load": pickle.dumps(_Call(np.load, str(marker)), protocol=4),
    }


@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        "builtins.eval",
        "builtins.exec",
        "subprocess.check_call",
        "os.system (GLOBAL)",
        "nested",
        "builtins.getattr",
        "numpy.load",
    ],
)
def test_hostile_pickle_refused_and_not_run(tmp_path, name):
    marker = tmp_path / "pwned"
    payload = _hostile_payloads(marker)[name]
    path = tmp_path / "evil.bin"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=r"refusing to load global .*evil\.bin"):
        load_bin(path)
    assert not marker.exists()


def test_hostile_payload_really_would_run(tmp_path):
    """Control: the same bytes through plain pickle do execute, so the test above proves something."""
    marker = tmp_path / "pwned"
    try:
        pickle.loads(_hostile_payloads(marker)["os.system (GLOBAL)"])
    finally:
        ran = marker.exists()
    assert ran


def test_malformed_files(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(b"\x80\x04\x95garbage")
    with pytest.raises(DataError, match="bad.bin"):
        load_bin(path)
    path.write_bytes(pickle.dumps({"bins": []}))
    with pytest.raises(DataError, match=r"\(bins, issame_list\)"):
        load_bin(path)
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
    with pytest.raises(DataError, match="3 images for 1 pairs"):
        load_bin(path)
    path.write_bytes(pickle.dumps(([b"a", 5], [True])))
    with pytest.raises(DataError, match="image 1 is a int"):
        load_bin(path)
    path.write_bytes(pickle.dumps(([b"a", b"b"], [1])))
    with pytest.raises(DataError, match="not bool"):
        load_bin(path)
    with pytest.raises(DataError, match="cannot read"):
        load_bin(tmp_path / "missing.bin")
