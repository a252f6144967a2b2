"""Benchmark: the training input pipeline vs a plain two-process decode loop and vs Ray Data.

    python bench/loader.py [--shards DIR] [--images 6000] [--batch 128] [--workers 2] [--s3]

Prints one JSON object: `images_s` (ShardLoader, default mode, an epoch of shuffled, flipped uint8
batches: the float normalisation now runs on the training device, see `cpu_normalise_images_s` for
its cost on a CPU device), `baseline_images_s` (two processes, each: pyarrow row-group read,
cv2.imdecode, flip, normalise to float32, over the same shards in the same run), their `ratio`
(goal >= 0.9), and the anchor `decode_only_images_s`: one thread running bare `cv2.imdecode` over the
same payloads, already in memory; `ratio_vs_decode_only` = loader images/s per decode thread / that
(goal >= 0.9). Best of `--repeats`, with `*_median` beside. `rss_mb_small` / `rss_mb_large`: peak RSS
of a fresh process running the loader over the `--images` shards (10 epochs) and over 10x as many
images written for it (1 epoch: as many batches), same shuffle window (`rss_window_rows`): flat
when memory does not grow with the dataset.
Also the other loader mode's rate for reference, and `ray_data_images_s`: Ray Data on a
local 2-CPU Ray started here (`read_parquet` -> `map_batches` doing the same decode, flip and
normalise to float NCHW -> `iter_torch_batches`), with `ratio_vs_ray_data` = images_s / that rate,
and `ray_data_uint8_images_s` / `ratio_vs_ray_data_uint8` for a tuned variant that ships uint8 images
through the object store and normalises them in `iter_torch_batches`' collate threads.
With `--s3`, the same shards are copied into a bucket of a moto S3 server started on 127.0.0.1 and
the loader streams them from there (range reads of row groups): `s3_images_s` and
`ratio_s3_vs_local` (goal >= 0.9; the server's own CPU comes out of the same two cores).
Runs are interleaved so load from elsewhere on the machine hits all alike; the best of `--repeats`
is kept. Without --shards it writes synthetic 112x112 JPEG shards to a temp dir first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_shards(
    out: Path, images: int, size: int = 112, per_shard: int = 2000, row_group: int = 500
) -> list[Path]:
    import cv2
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    base = cv2.GaussianBlur(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), (0, 0), 3)
    paths = []
    for start in range(0, images, per_shard):
        n = min(per_shard, images - start)
        blobs = []
        for i in range(n):
            img = np.roll(base, (start + i) % size, axis=1)
            img = cv2.add(img, rng.integers(0, 40, img.shape, dtype=np.uint8))
            blobs.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
        table = pa.table(
            {
                "key": pa.array(np.arange(start, start + n), pa.int64()),
                "label": pa.array(np.arange(start, start + n) // 10, pa.int64()),
                "image": pa.array(blobs, pa.binary()),
            }
        )
        path = out / f"part-{start // per_shard:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group, compression="none")
        paths.append(path)
    return paths


def _baseline_part(units: list[tuple[str, int]]) -> int:
    import cv2
    import pyarrow.parquet as pq

    count = 0
    for path, rg in units:
        column = pq.ParquetFile(path).read_row_group(rg, columns=["image", "label"]).column("image")
        for blob in column.to_pylist():
            img = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
            img = img[:, ::-1] if count % 2 else img
            x = (img.astype(np.float32) - 127.5) / 128.0
            count += int(x.shape[0] > 0)
    return count


def baseline(paths: list[Path]) -> float:
    from facepipe.data.loader import shard_units

    units = [(u.path, u.row_group) for u in shard_units(paths)]
    parts = [units[0::2], units[1::2]]
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_baseline_part, [[], []])  # start-up outside the timing
        t0 = time.perf_counter()
        total = sum(pool.map(_baseline_part, parts))
        return total / (time.perf_counter() - t0)


def loader_rate(paths: list, batch: int, workers: int, mode: str, size: int) -> tuple[float, int]:
    """(images/s of one epoch, decode threads or processes the loader ran)."""
    from facepipe.data.loader import ShardLoader

    with ShardLoader(paths, batch, (size, size), workers=workers, mode=mode, prefetch=4) as loader:
        next(iter(loader.epoch(99)))  # warm-up (pool start) outside the timing
        t0 = time.perf_counter()
        n = sum(len(b.labels) for b in loader.epoch(0))
        return n / (time.perf_counter() - t0), loader.workers


@contextlib.contextmanager
def s3_copy(paths: list[Path], tmp: Path):
    """The same shards in a bucket of a moto S3 server started here on 127.0.0.1 (stopped after)."""
    from facepipe import storage
    from tests.s3_server import start_s3_server

    server = start_s3_server(tmp / "moto.log")
    saved = {k: os.environ.get(k) for k in server.env()}
    try:
        os.environ.update(server.env())
        server.create_bucket("bench")
        uris = []
        for path in paths:
            uris.append(f"s3://bench/shards/{path.parent.name}/{path.name}")
            storage.write_bytes(uris[-1], path.read_bytes())
        yield uris
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def payloads(paths: list[Path]) -> list[np.ndarray]:
    """Every image's encoded bytes, in memory (the decode-only anchor reads no file)."""
    import pyarrow.parquet as pq

    out = []
    for path in paths:
        for blob in pq.read_table(path, columns=["image"]).column("image").to_pylist():
            out.append(np.frombuffer(blob, np.uint8))
    return out


def decode_only_rate(blobs: list[np.ndarray]) -> float:
    """Images/s of one thread doing nothing but `cv2.imdecode` (the per-thread ceiling)."""
    import cv2

    t0 = time.perf_counter()
    for blob in blobs:
        cv2.imdecode(blob, cv2.IMREAD_COLOR)
    return len(blobs) / (time.perf_counter() - t0)


def cpu_normalise_rate(batch: int, size: int) -> float:
    """Images/s of the device-side normalisation when the device is the CPU (the training thread)."""
    import torch

    from facepipe.models.preprocess import to_model_input

    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)
    to_model_input(images)
    t0 = time.perf_counter()
    for _ in range(5):
        to_model_input(images)
    return 5 * batch / (time.perf_counter() - t0)


# RSS sampled at every batch (ru_maxrss would report the import-time peak of torch instead)
_RSS_CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
from facepipe.data.loader import ShardLoader
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
peak = 0.0
with ShardLoader(sys.argv[4:], int(sys.argv[2]), window_rows=int(sys.argv[2]) * 2) as loader:
    for epoch in range(int(sys.argv[3])):
        for _ in loader.epoch(epoch):
            peak = max(peak, rss())
print(peak)
"""


def peak_rss_mb(paths: list[Path], batch: int, epochs: int = 1) -> float:
    """Peak RSS (MB, sampled per batch) of a fresh process running `epochs` loader epochs over `paths`.

    The small dataset runs 10 epochs, so both sizes decode as many batches: the allocators' pools
    (glibc arenas, Arrow's mimalloc) fill up over the first few dozen batches and row-group reads
    whatever the dataset, which is not what is compared.
    """
    root = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-c", _RSS_CHILD, root, str(batch), str(epochs), *map(str, paths)]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


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
    """Images/s of one pass of Ray Data (on the Ray this process started) over the shards.

    `as_float`: the map step normalises (what a straightforward port of the loader does); otherwise it
    ships uint8 images (4x fewer bytes through the object store) and `iter_torch_batches` normalises
    them in its prefetch threads (`collate_fn`).
    """
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=None, help="a decoded dataset (decode's OUT)")
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-ray-data", action="store_true", help="skip the Ray Data comparison")
    parser.add_argument(
        "--s3", action="store_true", help="also stream the shards from a local moto S3 server"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            from facepipe.data.dataset import Dataset

            paths = Dataset.open(args.shards).training_shards
        else:
            paths = write_shards(Path(tmp), args.images)
        from facepipe.data.loader import shard_units

        size = 112
        import cv2
        import pyarrow.parquet as pq

        first = pq.ParquetFile(paths[0]).read_row_group(0, columns=["image"]).column("image")[0].as_py()
        size = cv2.imdecode(np.frombuffer(first, np.uint8), cv2.IMREAD_COLOR).shape[0]
        # interleave the runs so load from elsewhere on the machine hits all alike; keep the best.
        # The loader and its baseline run before Ray starts: a Ray driver's own threads (core worker,
        # log and metrics pollers) share this process with the loader's decode threads but not with
        # the baseline's processes, which would tilt the comparison.
        rows = sum(u.rows for u in shard_units(paths))
        blobs = payloads(paths)
        base, thread, process, decode, ray_data, ray_data_u8, s3 = [], [], [], [], [], [], []
        threads = 1
        with s3_copy(paths, Path(tmp)) if args.s3 else contextlib.nullcontext() as uris:
            for _ in range(args.repeats):
                base.append(baseline(paths))
                rate, threads = loader_rate(paths, args.batch, args.workers, "thread", size)
                thread.append(rate)
                decode.append(decode_only_rate(blobs))
                process.append(loader_rate(paths, args.batch, args.workers, "process", size)[0])
                if uris:
                    s3.append(loader_rate(uris, args.batch, args.workers, "thread", size)[0])
        per_thread = [r / threads for r in thread]
        large = write_shards(Path(tmp) / "large", 10 * rows, size=size)
        rss_small, rss_large = peak_rss_mb(paths, args.batch, 10), peak_rss_mb(large, args.batch)
        if not args.no_ray_data:
            with local_ray(2):
                # warm-up: Ray's worker processes start outside the timing
                ray_data_rate(paths[:1], args.batch)
                for _ in range(args.repeats):
                    ray_data.append(ray_data_rate(paths, args.batch))
                    ray_data_u8.append(ray_data_rate(paths, args.batch, as_float=False))
    med = statistics.median
    out = {
        "images": rows,
        "image_size": size,
        "batch": args.batch,
        "workers": args.workers,
        "decode_threads": threads,
        "images_s": round(max(thread), 1),
        "images_s_median": round(med(thread), 1),
        "baseline_images_s": round(max(base), 1),
        "baseline_images_s_median": round(med(base), 1),
        "ratio": round(max(thread) / max(base), 3),
        "ratio_median": round(med(thread) / med(base), 3),
        "decode_only_images_s": round(max(decode), 1),
        "decode_only_images_s_median": round(med(decode), 1),
        "ratio_vs_decode_only": round(max(per_thread) / max(decode), 3),
        "ratio_vs_decode_only_median": round(med(per_thread) / med(decode), 3),
        "cpu_normalise_images_s": round(cpu_normalise_rate(args.batch, size), 1),
        "process_mode_images_s": round(max(process), 1),
        "process_mode_ratio": round(max(process) / max(base), 3),
        "rss_images_small": rows,
        "rss_images_large": 10 * rows,
        "rss_mb_small": round(rss_small, 1),
        "rss_mb_large": round(rss_large, 1),
        "rss_window_rows": 2 * args.batch,
    }
    if s3:  # the moto server shares this machine's cores with the loader, unlike a real endpoint
        out |= {
            "s3_images_s": round(max(s3), 1),
            "s3_images_s_median": round(med(s3), 1),
            "ratio_s3_vs_local": round(max(s3) / max(thread), 3),
            "ratio_s3_vs_local_median": round(med(s3) / med(thread), 3),
        }
    if ray_data:
        out |= {
            "ray_data_images_s": round(max(ray_data), 1),
            "ratio_vs_ray_data": round(max(thread) / max(ray_data), 3),
            "ray_data_uint8_images_s": round(max(ray_data_u8), 1),
            "ratio_vs_ray_data_uint8": round(max(thread) / max(ray_data_u8), 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
