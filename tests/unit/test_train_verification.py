"""Training-time verification: tables split between ranks join back into the single-process result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facepipe.data.shards import pair_tables
from facepipe.models.embed import embed_images
from facepipe.models.registry import build_backbone
from facepipe.train.features import merge_verification, verify_pairs


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    from facepipe.data.decode.job import decode_dataset
    from facepipe.data.synth.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("verify")
    generate(root / "raw", SynthConfig(identities=12, images_per_identity=3, pairs=40, size=64, seed=5))
    decode_dataset([root / "raw"], root / "shards", workers=1)
    return root


def _model():
    torch.manual_seed(0)
    return build_backbone("iresnet_tiny", input_size=(56, 56)).eval()


def test_split_between_ranks_equals_one_process(decoded):
    model = _model()
    assert len(pair_tables(decoded / "shards")) >= 2  # otherwise the split is not exercised
    args = (model, decoded / "shards", (56, 56), "RGB", 10, True)
    whole = verify_pairs(*args, flip=False)
    parts = [verify_pairs(*args, flip=False, rank=r, world=2) for r in range(2)]
    assert all(parts) and set(parts[0]).isdisjoint(set(parts[1]) - {"accuracy"})
    merged = merge_verification(parts)
    assert merged.keys() == whole.keys()
    for key, value in whole.items():
        assert merged[key] == pytest.approx(value), key
    # with more ranks than tables, a rank with nothing to do returns an empty part
    assert verify_pairs(*args, flip=False, rank=5, world=6) == {}
    assert merge_verification([whole, {}]) == whole


def test_mirror_is_optional_and_channels_last_models_embed_alike():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 56, 56, 3), dtype=np.uint8)
    model = _model()
    emb, flipped, _ = embed_images(model, images, flip=True)
    assert flipped is not None and not np.allclose(emb, flipped)
    assert embed_images(model, images, flip=False)[1] is None
    nhwc = _model().to(memory_format=torch.channels_last)
    emb_nhwc, flipped_nhwc, _ = embed_images(nhwc, images, flip=True)
    np.testing.assert_allclose(emb_nhwc, emb, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(flipped_nhwc, flipped, rtol=1e-4, atol=1e-4)
