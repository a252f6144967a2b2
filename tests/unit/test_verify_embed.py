"""Using a model on photos: the operating point, `facepipe verify`, `facepipe embed`, the pyfunc's inputs.

The model is a tiny untrained backbone + ProbFace head, so its decisions mean nothing; what is checked is
that real photos from the shared fixtures go through detection, alignment and embedding end to end, that
the printed score is the one the library computes, and that the decision follows the threshold rule.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from facepipe import cli
from facepipe.models import operating
from facepipe.models.photo import FaceModel, PhotoAligner, read_photo

DETECTOR = "models/face_detection_yunet_2023mar.onnx"


def tiny_model(root: Path, method: str | None = "probface", seed: int = 0) -> Path:
    """A backbone bundle (iresnet_tiny, 32x32 input, 16-d) and, with `method`, an untrained head."""
    from facepipe.models.bundle import BundleInfo, save_bundle
    from facepipe.models.registry import build_backbone
    from facepipe.uncertainty.head_io import build_head_model, save_head

    torch.manual_seed(seed)
    kwargs = {"embedding_size": 16, "input_size": [32, 32]}
    backbone = build_backbone("iresnet_tiny", **kwargs).eval()
    save_bundle(
        root / "bundle", backbone, BundleInfo("iresnet_tiny", kwargs, 16, (32, 32), "RGB", 5, "cosface")
    )
    if method is not None:
        with torch.no_grad():
            _, fmap = backbone.forward_features(torch.zeros(1, 3, 32, 32))
        shape = tuple(fmap.shape[1:])
        head = build_head_model(method, shape, 16, {})
        meta = {"method": method, "map_shape": list(shape), "embedding_size": 16, "extra": {}}
        save_head(root / "head", head, meta)
    return root


def same_and_different(faces_dir: Path) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    """The first same-person and the first different-person pair of verification_pairs.txt."""
    pairs = {}
    for line in (faces_dir / "verification_pairs.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        a, b, same = line.split("\t")
        pairs.setdefault(same, (faces_dir / a, faces_dir / b))
    return pairs["1"], pairs["0"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------
# The operating point
# ---------------------------------------------------------------------------------------------


def test_threshold_at_far_bounds_the_impostor_accept_rate():
    rng = np.random.default_rng(0)
    impostors = rng.normal(size=5000)
    for far in (1e-1, 1e-2, 1e-3):
        thr = operating.threshold_at_far(impostors, far)
        accepted = np.mean(impostors > thr)
        assert accepted <= far
        assert accepted >= far - 1.0 / impostors.size  # the tightest such threshold, not just any
    # fewer impostors than 1/FAR: the threshold is the largest impostor score, none is accepted
    assert operating.threshold_at_far(impostors[:100], 1e-3) == impostors[:100].max()
    assert operating.rate_key(1e-3) == "1e-3" and operating.rate_key(0.05) == "5e-2"


def test_operating_point_tags_pick_and_decide():
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.normal(1, 0.3, 500), rng.normal(0, 0.3, 2000)])
    issame = np.r_[np.ones(500, bool), np.zeros(2000, bool)]
    unc = rng.uniform(size=5000)
    tags = operating.operating_point(scores, issame, unc, "cosine", fars=(1e-2, 1e-3), reject=0.2)
    assert tags["threshold.score"] == "cosine" and tags["threshold.n_impostors"] == "2000"
    threshold, risk = operating.pick(tags, 1e-3)
    assert threshold == operating.threshold_at_far(scores[~issame], 1e-3)
    assert risk == pytest.approx(np.quantile(unc, 0.8))
    with pytest.raises(Exception, match=r"no threshold for FAR 1e-4 \(stored: FAR 1e-2, 1e-3\)"):
        operating.pick(tags, 1e-4)
    assert operating.decide(threshold + 0.01, 0.1, 0.1, threshold, risk) == "same"
    assert operating.decide(threshold, 0.1, 0.1, threshold, risk) == "different"
    assert operating.decide(threshold + 1, 0.1, risk + 0.01, threshold, risk) == "rejected"
    assert operating.decide(threshold + 1, math.nan, math.nan, threshold, risk) == "same"  # no head


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tiny_model(tmp_path_factory.mktemp("model"))
    # a stored operating point, as `facepipe verify` reads it beside a local model folder
    rng = np.random.default_rng(2)
    tags = operating.operating_point(
        rng.normal(size=400), rng.random(400) < 0.5, rng.uniform(0, 1, 800), "mls_probface"
    )
    operating.write_point_file(root, tags)
    return root


def test_verify_same_and_different_real_photos(model_dir, faces_dir, capsys):
    detector = faces_dir / DETECTOR
    model = FaceModel(model_dir)
    aligner = PhotoAligner(detector, model.input_size, 0.6)
    threshold, risk = operating.pick(operating.read_point_file(model_dir), 1e-3)
    for a, b in same_and_different(faces_dir):
        code, out, err = run_cli(
            capsys, "verify", a, b, "--model", model_dir, "--detector-model", detector, "--json"
        )
        assert code == 0, err
        result = json.loads(out)
        assert set(result) >= {"score", "uncertainty_a", "uncertainty_b", "decision", "threshold", "far"}
        assert isinstance(result["score"], float) and math.isfinite(result["score"])
        assert result["uncertainty_a"] > 0 and result["uncertainty_b"] > 0  # ProbFace's σ²
        assert result["far"] == 1e-3 and result["threshold"] == threshold
        assert result["detection_score_a"] >= 0.6 and result["detection_score_b"] >= 0.6
        # the same score through the library: detect, align, embed, the method's pair score
        faces = [aligner.align(read_photo(p), str(p)) for p in (a, b)]
        emb = model.embed(model.to_input([f.crop for f in faces]))
        score = model.score(emb["embedding"][:1], emb["u"][:1], emb["embedding"][1:], emb["u"][1:])[0]
        assert result["score"] == pytest.approx(score, rel=1e-5, abs=1e-6)
        assert result["uncertainty_a"] == pytest.approx(emb["uncertainty"][0], rel=1e-5)
        if max(result["uncertainty_a"], result["uncertainty_b"]) > risk:
            assert result["decision"] == "rejected"
        else:
            assert result["decision"] == ("same" if result["score"] > threshold else "different")
    # the text form names the decision; an explicit threshold replaces the stored one
    (a, b), _ = same_and_different(faces_dir)
    code, out, _ = run_cli(
        capsys, "verify", a, b, "--model", model_dir, "--detector-model", detector, "--threshold=-1e9"
    )
    assert code == 0 and "decision" in out and "(given)" in out


def test_verify_photo_without_face_or_unreadable_is_one_clear_line(model_dir, faces_dir, tmp_path, capsys):
    import cv2

    detector = faces_dir / DETECTOR
    (face, _), _ = same_and_different(faces_dir)
    blank = tmp_path / "wall.jpg"
    cv2.imwrite(str(blank), np.full((240, 320, 3), 128, np.uint8))
    code, out, err = run_cli(
        capsys, "verify", face, blank, "--model", model_dir, "--detector-model", detector
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no face found" in err and str(blank) in err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    code, _, err = run_cli(capsys, "verify", broken, face, "--model", model_dir, "--detector-model", detector)
    assert code == 2 and err.count("\n") == 1 and str(broken) in err
    # a model without a stored operating point: said at once, with the way out
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns(operating.POINT_FILE))
    code, _, err = run_cli(capsys, "verify", face, face, "--model", bare, "--detector-model", detector)
    assert code == 2 and "no threshold for FAR 1e-3" in err and "--threshold" in err


# ---------------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------------


def test_embed_folder_writes_embeddings_and_rejects(model_dir, faces_dir, tmp_path, capsys):
    import cv2
    import pyarrow.parquet as pq

    (a, b), _ = same_and_different(faces_dir)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(a.read_bytes())
    (folder / "sub" / "b.jpg").write_bytes(b.read_bytes())
    cv2.imwrite(str(folder / "wall.png"), np.full((200, 200, 3), 90, np.uint8))
    (folder / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "emb.parquet"
    code, _, err = run_cli(
        capsys, "embed", folder, "--model", model_dir, "--detector-model", faces_dir / DETECTOR, "--out", out
    )
    assert code == 0, err
    table = pq.read_table(out).to_pydict()
    assert table["path"] == ["a.jpg", "sub/b.jpg"]
    rejects = pq.read_table(tmp_path / "emb.rejects.parquet").to_pydict()
    assert dict(zip(rejects["path"], rejects["reason"], strict=True)) == {
        "broken.jpg": "unreadable",
        "wall.png": "no_face",
    }
    model = FaceModel(model_dir)
    aligner = PhotoAligner(faces_dir / DETECTOR, model.input_size, 0.6)
    crops = [aligner.align(read_photo(p), str(p)).crop for p in (a, b)]
    expected = model.embed(model.to_input(crops))
    np.testing.assert_allclose(np.asarray(table["embedding"]), expected["embedding"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table["uncertainty"], expected["uncertainty"], rtol=1e-5)
    assert all(s >= 0.6 for s in table["detection_score"])


# ---------------------------------------------------------------------------------------------
# The pyfunc's inputs (without MLflow: the HTTP test is tests/integration/test_model_serve.py)
# ---------------------------------------------------------------------------------------------


def test_pyfunc_takes_tensors_encoded_crops_and_photos(model_dir, faces_dir):
    import cv2
    import pandas as pd

    from facepipe.errors import FacepipeError
    from facepipe.models.export import pyfunc_predict
    from facepipe.models.preprocess import to_model_input

    detector = str(faces_dir / DETECTOR)
    model = FaceModel(model_dir)
    (a, b), _ = same_and_different(faces_dir)
    aligner = PhotoAligner(detector, model.input_size, 0.6)
    crops = [aligner.align(read_photo(p), str(p)).crop for p in (a, b)]
    # the crop at the model's size, losslessly (PNG): encoded and tensor inputs must agree exactly
    small = [cv2.resize(c, (32, 32), interpolation=cv2.INTER_AREA) for c in crops]
    pngs = [cv2.imencode(".png", c)[1].tobytes() for c in small]
    tensor = to_model_input(model.to_input(small)).contiguous().numpy()
    want = pyfunc_predict(model, detector, tensor, {})
    assert set(want) == {"embedding", "uncertainty"} and want["embedding"].shape == (2, 16)
    for given in (pngs, [base64.b64encode(p).decode() for p in pngs], pd.DataFrame({"image": pngs})):
        got = pyfunc_predict(model, detector, given, {})
        np.testing.assert_allclose(got["embedding"], want["embedding"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["uncertainty"], want["uncertainty"], rtol=1e-5)
    # a whole photo with align=true goes through detection: the embedding of `embed`/`verify`
    photos = [base64.b64encode(p.read_bytes()).decode() for p in (a, b)]
    got = pyfunc_predict(model, detector, photos, {"align": True})
    np.testing.assert_allclose(got["embedding"], model.embed(model.to_input(crops))["embedding"], rtol=1e-5)
    with pytest.raises(FacepipeError, match=r"tensor input must be \(N, 3, 32, 32\)"):
        pyfunc_predict(model, detector, np.zeros((2, 3, 16, 16), np.float32), {})
    with pytest.raises(FacepipeError, match="not base64"):
        pyfunc_predict(model, detector, ["%%%"], {})
    with pytest.raises(FacepipeError, match="needs a face detector"):
        pyfunc_predict(model, None, photos, {"align": True})
