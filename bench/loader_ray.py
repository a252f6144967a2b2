"""Ray Data doing the loader's work, for bench/loader.py's comparison (`ray_data_*` fields)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np


def _ray_data_decode(batch: dict[str, np.ndarray], as_float: bool = True) -> dict[str, np.ndarray]:
    """The loader's work on one Ray Data batch: decode, flip every other image, normalise to float NCHW
    (or, with `as_float=False`, stop at uint8 NHWC and leave the normalising to the consumer)."""
    import cv2

    from facepipe.data.loader import MEAN, SCALE

    blobs = batch["image"]
    first = cv2.imdecode(np.frombuffer(blobs[0], np.uint8), cv2.IMREAD_COLOR)
    h, w = first.shape[:2]
    out = (
        np.empty((len(blobs), 3, h, w), np.float32) if as_float else np.empty((len(blobs), h, w, 3), np.uint8)
    )
    for i, blob in enumerate(blobs):
        img = first if i == 0 else cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
        if i % 2:
            img = img[:, ::-1]
        if as_float:
            np.subtract(img.transpose(2, 0, 1), MEAN, out=out[i])
        else:
            out[i] = img
    if as_float:
        out *= SCALE
    return {"image": out, "label": np.asarray(batch["label"], np.int64)}


def normalise_collate() -> Any:
    """A collate step for `iter_torch_batches`: uint8 NHWC -> float NCHW, as the loader's feeder does."""
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    from facepipe.data.loader import normalise

    class NormaliseCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            labels = torch.from_numpy(np.ascontiguousarray(batch["label"]))
            return {"image": normalise(batch["image"]), "label": labels}

    return NormaliseCollate()


def ray_data_rate(paths: list[Path], batch: int, as_float: bool = True) -> float:
    """Images/s of one pass of Ray Data (on the Ray this process started) over the shards. `as_float`:
    the map step normalises; else it ships uint8 (4x fewer bytes) and the collate threads normalise."""
    import ray.data

    ds = ray.data.read_parquet([str(p) for p in paths]).select_columns(["image", "label"])
    ds = ds.map_batches(
        _ray_data_decode, batch_size=batch, batch_format="numpy", fn_kwargs={"as_float": as_float}
    )
    collate = None if as_float else normalise_collate()
    t0 = time.perf_counter()
    n = 0
    for b in ds.iter_torch_batches(batch_size=batch, prefetch_batches=4, collate_fn=collate):
        n += len(b["label"])
    return n / (time.perf_counter() - t0)


@contextlib.contextmanager
def local_ray(cpus: int):
    """A fresh local Ray with `cpus` CPUs for the duration of the block (never another instance)."""
    import ray
    import ray.data

    ray.init(
        address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        yield
    finally:
        ray.shutdown()
