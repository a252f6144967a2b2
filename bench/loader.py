"""Benchmark: the training input pipeline vs a plain two-process decode loop, bare decoding and Ray Data.

    python bench/loader.py [--shards DIR] [--images 6000] [--batch 128] [--workers 2] [--s3]

Prints one JSON object; rates are the best of `--repeats` (runs interleaved so load from elsewhere hits
all alike), `*_median` beside. `images_s`: ShardLoader (thread mode), an epoch of shuffled, flipped
uint8 batches following a whole epoch, as in training (`images_s_first_epoch`: a new loader's first,
which waits for its first row groups and starts the pool; `*_large`: both on the 10x dataset, where
that start is a tenth as large a part of the epoch). Normalising runs on the training device
(on a CPU it costs `cpu_normalise_images_s`).
`ratio` = images_s / `baseline_images_s` (two processes each reading row groups, decoding, flipping,
normalising to float32; goal >= 0.9). `ratio_vs_decode_only` = images/s per decode thread /
`decode_only_images_s`, the anchor: one thread running bare `cv2.imdecode` over the same payloads in
memory (goal >= 0.9); `..._one_thread`: the same with one decode thread. `batch_decoder`: whether
the C batch decoder (one GIL release per batch) was built; `images_s_per_image_decoder` and its
ratio: the same loader with it turned off (image by image in Python, as before it). `simplejpeg_*`:
the per-image path's decoder in the same bare loop (chosen by this measurement). Beside them:
`ratio_cpu_vs_decode_only` (the anchor's CPU per image / the loader process's, all threads counted:
decoders, reader, consumer), and `two_core_scaling` (per-process rate of two bare loops at once / the
anchor: the ceiling of a two-thread per-thread ratio on this machine).
`rss_mb_small/large`: peak RSS of a fresh process running the loader over the shards (10 epochs) and
over 10x as many (1 epoch), same window (`rss_window_rows`): flat when memory does not grow with the
dataset. `ray_data_*`: Ray Data on a local 2-CPU Ray doing the same work, float or uint8 (normalised
in the collate threads). `--s3`: the shards also go to a moto S3 server on 127.0.0.1 and an epoch is
streamed from it (`s3_images_s`) and from disk (`s3_local_images_s`) with the same window
(`--s3-window-rows`: an epoch of several windows, as in real datasets, not one whose first fetch is
the whole epoch); `ratio_s3_vs_local` (goal >= 0.9). The server's CPU comes out of the same cores
(`s3_server_cpu_us_per_image`), so the pair runs `--s3-workers` decode threads (default 1): the
second core serves the requests, as a real endpoint's own machine would, and the ratio measures
what the read-ahead is for, hiding the requests' latency behind the decoding. Without --shards it
writes synthetic 112x112 JPEG shards first.
"""

from __future__ import annotations

import argparse
import collections
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
from unittest import mock

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
        keys = np.arange(start, start + n, dtype=np.int64)
        table = pa.table({"key": keys, "label": keys // 10, "image": pa.array(blobs, pa.binary())})
        path = out / f"part-{start // per_shard:05d}.parquet"
        # as facepipe's shard writer does (shards._writer_options): JPEG bytes plain, not dictionary-encoded
        options = {"compression": "none", "use_dictionary": False, "write_statistics": ["key", "label"]}
        pq.write_table(table, path, row_group_size=row_group, **options)
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


def loader_rate(
    paths: list, batch: int, workers: int, mode: str, size: int, window_rows: int = 8192, server: int = 0
) -> tuple[float, int, float, float, float]:
    """(images/s of an epoch mid-training, decode threads or processes run, CPU s per image of this
    process: every thread, the honest cost, CPU s per image of process `server` (0: none) during the
    epoch, images/s of the loader's first epoch). The timed epoch follows a whole one, as in training
    (its first row groups were read while the one before ended); the first pays the pool's start."""
    from facepipe.data.loader import ShardLoader

    kwargs = {"workers": workers, "mode": mode, "prefetch": 4, "window_rows": window_rows}
    with ShardLoader(paths, batch, (size, size), **kwargs) as loader:
        t0 = time.perf_counter()
        first = sum(len(b.labels) for b in loader.epoch(0)) / (time.perf_counter() - t0)
        c0, t0, s0 = time.process_time(), time.perf_counter(), cpu_seconds(server) if server else 0.0
        n = sum(len(b.labels) for b in loader.epoch(1))
        rate, cpu = n / (time.perf_counter() - t0), (time.process_time() - c0) / n
        return rate, loader.workers, cpu, ((cpu_seconds(server) - s0) / n if server else 0.0), first


@contextlib.contextmanager
def s3_copy(paths: list[Path], tmp: Path):
    """The same shards in a bucket of a moto S3 server started here on 127.0.0.1 (stopped after):
    (their URIs, the server's pid)."""
    from facepipe import storage
    from tests.s3_server import start_s3_server

    server = start_s3_server(tmp / "moto.log")
    try:
        with mock.patch.dict(os.environ, server.env()):
            server.create_bucket("bench")
            uris = [f"s3://bench/shards/{p.parent.name}/{p.name}" for p in paths]
            for path, uri in zip(paths, uris, strict=True):
                storage.write_bytes(uri, path.read_bytes())
            yield uris, server.proc.pid
    finally:
        server.stop()


def payloads(paths: list[Path]) -> list[np.ndarray]:
    """Every image's encoded bytes, in memory (the decode-only anchor reads no file)."""
    import pyarrow.parquet as pq

    out = []
    for path in paths:
        for blob in pq.read_table(path, columns=["image"]).column("image").to_pylist():
            out.append(np.frombuffer(blob, np.uint8))
    return out


def decode_only_rate(blobs: list[np.ndarray]) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of one thread doing nothing but `cv2.imdecode` (the per-thread
    ceiling)."""
    import cv2

    c0, t0 = time.thread_time(), time.perf_counter()
    for blob in blobs:
        cv2.imdecode(blob, cv2.IMREAD_COLOR)
    return len(blobs) / (time.perf_counter() - t0), (time.thread_time() - c0) / len(blobs)


def simplejpeg_only_rate(blobs: list[np.ndarray], size: int) -> float:
    """Images/s of one thread running bare `simplejpeg.decode_jpeg` into one buffer (the loader's
    decoder, measured beside cv2's to choose between them)."""
    import simplejpeg

    buffer = np.empty((size, size, 3), np.uint8)
    t0 = time.perf_counter()
    for blob in blobs:
        simplejpeg.decode_jpeg(blob, colorspace="BGR", buffer=buffer)
    return len(blobs) / (time.perf_counter() - t0)


def _decode_only_child(paths: list[Path], start: float) -> float:
    blobs = payloads(paths)
    time.sleep(max(start - time.time(), 0.0))  # both children time their loops together
    return decode_only_rate(blobs)[0]


def decode_only_pair(paths: list[Path]) -> float:
    """Images/s of each of two processes running the bare loop at once (mean): what two cores give
    two decoders here, the ceiling of a two-thread loader's per-thread rate."""
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(abs, [0, 0])  # start-up outside the timing
        start = time.time() + 1.0
        return statistics.mean(pool.starmap(_decode_only_child, [(paths, start)] * 2))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    import psutil

    return sum(psutil.Process(pid).cpu_times()[:2])


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
    (The small dataset runs 10 epochs, so both sizes decode as many batches: the allocators' pools fill
    up over the first few dozen batches whatever the dataset, which is not what is compared.)"""
    root = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-c", _RSS_CHILD, root, str(batch), str(epochs), *map(str, paths)]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def best_and_median(name: str, values: list[float], digits: int = 1) -> dict[str, float]:
    """{name: best, name_median: median} of a measurement's repeats."""
    return {name: round(max(values), digits), f"{name}_median": round(statistics.median(values), digits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=None, help="a decoded dataset (decode's OUT)")
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-ray-data", action="store_true", help="skip the Ray Data comparison")
    parser.add_argument("--s3", action="store_true", help="also stream the shards from a local S3 server")
    parser.add_argument("--s3-window-rows", type=int, default=1000, help="shuffle window of the S3 pair")
    parser.add_argument("--s3-workers", type=int, default=1, help="decode threads of the S3 pair")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            from facepipe.data.dataset import Dataset

            paths = Dataset.open(args.shards).training_shards
        else:
            paths = write_shards(Path(tmp), args.images)
        import cv2
        import pyarrow.parquet as pq

        from facepipe.data.formats.decode_into import batch_decoder_built, use_batch_decoder
        from facepipe.data.loader import shard_units

        first = pq.ParquetFile(paths[0]).read_row_group(0, columns=["image"]).column("image")[0].as_py()
        size = cv2.imdecode(np.frombuffer(first, np.uint8), cv2.IMREAD_COLOR).shape[0]
        # interleave the runs so load from elsewhere on the machine hits all alike; keep the best.
        # The loader and its baseline run before Ray starts: a Ray driver's own threads (core worker,
        # log and metrics pollers) share this process with the loader's decode threads but not with
        # the baseline's processes, which would tilt the comparison.
        rows = sum(u.rows for u in shard_units(paths))
        blobs = payloads(paths)
        runs: dict[str, list[float]] = collections.defaultdict(list)
        threads = 1
        large = write_shards(Path(tmp) / "large", 10 * rows, size=size)
        with s3_copy(paths, Path(tmp)) if args.s3 else contextlib.nullcontext((None, 0)) as (uris, moto):
            for _ in range(args.repeats):
                runs["base"].append(baseline(paths))
                rate, threads, cpu, _, first = loader_rate(paths, args.batch, args.workers, "thread", size)
                record(runs, thread=rate, thread_cpu=cpu, thread_first_epoch=first)
                rate, _, _, _, first = loader_rate(large, args.batch, args.workers, "thread", size)
                record(runs, thread_large=rate, thread_first_epoch_large=first)
                if batch_decoder_built():  # the same loader, image by image (the path before it)
                    previous = use_batch_decoder(False)
                    runs["per_image"].append(loader_rate(paths, args.batch, args.workers, "thread", size)[0])
                    use_batch_decoder(previous)
                record(runs, **dict(zip(("decode", "decode_cpu"), decode_only_rate(blobs), strict=True)))
                record(runs, decode_pair=decode_only_pair(paths))
                record(runs, simplejpeg=simplejpeg_only_rate(blobs, size))
                runs["thread1"].append(loader_rate(paths, args.batch, 1, "thread", size)[0])
                runs["process"].append(loader_rate(paths, args.batch, args.workers, "process", size)[0])
                if uris:  # the same epoch from disk and from the bucket, same shuffle window
                    local = (paths, args.batch, args.s3_workers, "thread", size, args.s3_window_rows)
                    runs["s3_local"].append(loader_rate(*local)[0])
                    rate, _, cpu, server, _ = loader_rate(uris, *local[1:], server=moto)
                    record(runs, s3=rate, s3_cpu=cpu, s3_server_cpu=server)
        rss_small, rss_large = peak_rss_mb(paths, args.batch, 10), peak_rss_mb(large, args.batch)
        if not args.no_ray_data:
            from bench.loader_ray import local_ray, ray_data_rate

            with local_ray(2):
                # warm-up: Ray's worker processes start outside the timing
                ray_data_rate(paths[:1], args.batch)
                for _ in range(args.repeats):
                    runs["ray_data"].append(ray_data_rate(paths, args.batch))
                    runs["ray_data_u8"].append(ray_data_rate(paths, args.batch, as_float=False))
    out = _summary(runs, threads, args.s3_workers) | {"images": rows, "image_size": size, "batch": args.batch}
    from facepipe.data.formats.decode_into import batch_decoder_built

    out |= {"workers": args.workers, "decode_threads": threads, "batch_decoder": batch_decoder_built()}
    out |= {"cpu_normalise_images_s": round(cpu_normalise_rate(args.batch, size), 1)}
    out |= {"rss_images_small": rows, "rss_images_large": 10 * rows, "rss_window_rows": 2 * args.batch}
    out |= {"rss_mb_small": round(rss_small, 1), "rss_mb_large": round(rss_large, 1)}
    print(json.dumps(out))


def record(runs: dict[str, list[float]], **values: float) -> None:
    for name, value in values.items():
        runs[name].append(value)


def ratio(name: str, a: list[float], b: list[float], per: int = 1) -> dict[str, float]:
    """{name: best of a / per / best of b, name_median: the same of the medians}."""
    med = statistics.median
    return {name: round(max(a) / per / max(b), 3), f"{name}_median": round(med(a) / per / med(b), 3)}


def _summary(runs: dict[str, list[float]], threads: int, s3_workers: int) -> dict[str, float]:
    """The JSON fields of the timed runs: each best of the repeats with the median beside it."""
    per_cpu = {k: [1 / c for c in runs[k]] for k in ("thread_cpu", "decode_cpu", "s3_cpu")}  # images/CPU-s
    out = best_and_median("images_s", runs["thread"]) | best_and_median("baseline_images_s", runs["base"])
    out |= ratio("ratio", runs["thread"], runs["base"])
    out |= best_and_median("images_s_first_epoch", runs["thread_first_epoch"])
    out |= ratio("ratio_vs_decode_only_first_epoch", runs["thread_first_epoch"], runs["decode"], threads)
    # the same on the 10x dataset: a start-up cost paid once per loader is a smaller part of its epoch
    out |= ratio("ratio_vs_decode_only_large", runs["thread_large"], runs["decode"], threads)
    out |= ratio(
        "ratio_vs_decode_only_first_epoch_large", runs["thread_first_epoch_large"], runs["decode"], threads
    )
    out |= best_and_median("decode_only_images_s", runs["decode"])
    out |= ratio("ratio_vs_decode_only", runs["thread"], runs["decode"], threads)
    out |= best_and_median("images_s_one_thread", runs["thread1"])
    out |= ratio("ratio_vs_decode_only_one_thread", runs["thread1"], runs["decode"])
    if runs["per_image"]:
        out |= best_and_median("images_s_per_image_decoder", runs["per_image"])
        out |= ratio("ratio_vs_decode_only_per_image_decoder", runs["per_image"], runs["decode"], threads)
    out |= best_and_median("simplejpeg_decode_only_images_s", runs["simplejpeg"])
    out |= ratio("simplejpeg_vs_cv2_decode_only", runs["simplejpeg"], runs["decode"])
    out["loader_cpu_us_per_image"] = round(min(runs["thread_cpu"]) * 1e6, 1)
    out["decode_only_cpu_us_per_image"] = round(min(runs["decode_cpu"]) * 1e6, 1)
    out |= ratio("ratio_cpu_vs_decode_only", per_cpu["thread_cpu"], per_cpu["decode_cpu"])
    out |= best_and_median("decode_only_two_processes_images_s", runs["decode_pair"])
    out |= ratio("two_core_scaling", runs["decode_pair"], runs["decode"])
    out |= best_and_median("process_mode_images_s", runs["process"])
    out |= ratio("process_mode_ratio", runs["process"], runs["base"])
    out |= ratio("process_mode_ratio_vs_decode_only", runs["process"], runs["decode"], threads)
    if runs["s3"]:  # the moto server shares this machine's cores with the loader, unlike a real endpoint
        out |= best_and_median("s3_images_s", runs["s3"]) | best_and_median(
            "s3_local_images_s", runs["s3_local"]
        )
        out |= ratio("ratio_s3_vs_local", runs["s3"], runs["s3_local"])
        out["s3_loader_cpu_us_per_image"] = round(min(runs["s3_cpu"]) * 1e6, 1)
        out["s3_server_cpu_us_per_image"] = round(min(runs["s3_server_cpu"]) * 1e6, 1)
        out["s3_decode_workers"] = s3_workers
    if runs["ray_data"]:
        out |= best_and_median("ray_data_images_s", runs["ray_data"])
        out |= best_and_median("ray_data_uint8_images_s", runs["ray_data_u8"])
        out["ratio_vs_ray_data"] = round(max(runs["thread"]) / max(runs["ray_data"]), 3)
        out["ratio_vs_ray_data_uint8"] = round(max(runs["thread"]) / max(runs["ray_data_u8"]), 3)
    return out


if __name__ == "__main__":
    main()
