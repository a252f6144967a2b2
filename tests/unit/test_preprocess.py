"""uint8 batches normalised on the device give the same bits, and the same model output, as float batches."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from facepipe.data.loader import ShardLoader, normalise
from facepipe.errors import FacepipeError
from facepipe.models.preprocess import to_model_input


def _real_batch(tmp_path) -> torch.Tensor:
    from tests.unit.test_loader import write_shards

    shards = write_shards(tmp_path, n_shards=1, rows=20)
    with ShardLoader(shards, batch_size=8, input_size=(32, 32)) as loader:
        return next(iter(loader.epoch(0))).images


def test_device_normalisation_matches_the_float_path_bit_for_bit():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 6, 3), dtype=np.uint8)
    images[0, 0, 0] = [0, 255, 128]  # the extremes and the midpoint
    old = normalise(images)  # the float batch the loader used to yield
    new = to_model_input(torch.from_numpy(images), torch.device("cpu"))
    assert new.dtype == torch.float32 and tuple(new.shape) == (4, 3, 8, 6)
    assert new.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(new.numpy().view(np.int32), old.numpy().view(np.int32))
    plain = to_model_input(images, memory_format=torch.contiguous_format)
    assert plain.is_contiguous() and torch.equal(plain, old)


def test_same_model_output_through_old_and_new_paths(tmp_path):
    from facepipe.models.embed import embed_images
    from facepipe.models.registry import build_backbone
    from facepipe.train.loop import StageLoop

    torch.manual_seed(0)
    model = build_backbone("iresnet_tiny", input_size=(32, 32)).to(memory_format=torch.channels_last).eval()
    images = _real_batch(tmp_path)
    assert images.dtype == torch.uint8
    with torch.no_grad():
        # before: the loader's float NCHW (channels-last) batch, moved to the device in that layout
        old = model(normalise(images.numpy()).contiguous(memory_format=torch.channels_last))
        # now: the training loop's `place` turns the uint8 batch into the model input on the device
        loop = SimpleNamespace(device=torch.device("cpu"), input_memory_format=torch.channels_last)
        placed, labels = StageLoop.place(loop, (images, torch.arange(len(images))))
        new = model(placed)
    assert labels.dtype == torch.int64
    assert torch.equal(old, new)
    # evaluation's embedding goes through the same function
    emb, flipped, _ = embed_images(model, images.numpy(), flip=True)
    with torch.no_grad():
        float_batch = normalise(images.numpy()).contiguous(memory_format=torch.channels_last)
        ref = model.forward_features(float_batch)[0]
    assert np.array_equal(emb, ref.numpy()) and flipped is not None


def test_refuses_what_is_not_a_uint8_nhwc_batch():
    with pytest.raises(FacepipeError, match="uint8 NHWC"):
        to_model_input(torch.zeros(2, 3, 8, 8))
    with pytest.raises(FacepipeError, match="uint8 NHWC"):
        to_model_input(torch.zeros(2, 8, 8, 1, dtype=torch.uint8))
