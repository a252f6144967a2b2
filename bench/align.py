"""Benchmark `facepipe align` on an image folder, against plain decode + resize + encode of the same files.

Prints one JSON object:
- images_s: images per second through `run_align` with YuNet detection (as `facepipe align` runs it)
- images_s_max_side_640: the same with `--max-side 640` (detector input 2.5x smaller; faster, slightly
  less precise landmarks)
- images_s_landmarks: the same folder with a landmark file (no detection: decode, warp, encode)
- baseline_images_s: the floor work per image (read, decode, resize to 112x112, JPEG-encode), one process,
  measured in the same run; ratio_vs_baseline = images_s / (baseline_images_s * workers)
- peak_rss_mb: the largest resident set of the job (driver or any worker) for the detection run, and
  peak_rss_mb_small / peak_rss_mb_large for the landmark run at two input sizes 4x apart (flat memory)
The folder repeats the fixture photos (FACEPIPE_FACES_DIR, default ../shared/fixtures/faces) under
identity folders; without the fixture it uses generated images with landmarks only (images_s is then
null). Every measurement runs in a fresh child process. Usage: python bench/align.py [--images 400]
[--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FACES = Path(os.environ.get("FACEPIPE_FACES_DIR", REPO.parent / "shared" / "fixtures" / "faces"))
MODEL = FACES / "models" / "face_detection_yunet_2023mar.onnx"
PER_IDENTITY = 10


def build_folder(root: Path, count: int) -> tuple[Path, Path]:
    """`count` images in identity folders of 10, plus a landmark file for all of them."""
    import numpy as np

    src = root / f"src_{count}"
    lines = []
    photos = []
    if MODEL.is_file():
        manifest = json.loads((FACES / "manifest.json").read_text())
        photos = [(FACES / e["file"], e["detections"][0]["landmarks5"]) for e in manifest["images"]]
    else:
        import cv2

        from facepipe.data.align.job import TEMPLATES

        rng = np.random.default_rng(0)
        points = np.array(TEMPLATES["arcface"].points) * 3 + 40
        for i in range(20):
            image = rng.integers(0, 255, (420, 420, 3), dtype=np.uint8)
            path = root / f"generated_{i}.jpg"
            cv2.imwrite(str(path), image)
            photos.append((path, points.tolist()))
    for i in range(count):
        path, points = photos[i % len(photos)]
        rel = f"id{i // PER_IDENTITY:05d}/{i:06d}{path.suffix}"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, src / rel)
        lines.append(rel + " " + " ".join(f"{v:.2f}" for xy in points for v in xy))
    marks = root / f"landmarks_{count}.txt"
    marks.write_text("\n".join(lines) + "\n")
    return src, marks


def child(args: argparse.Namespace) -> None:
    """One measurement in this fresh process; prints a JSON line."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.case == "baseline":
        import cv2
        import numpy as np

        files = sorted(p for p in Path(args.src).rglob("*") if p.is_file())
        start = time.perf_counter()
        for path in files:
            image = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
            small = cv2.resize(image, (112, 112), interpolation=cv2.INTER_LINEAR)
            cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 95])
        seconds = time.perf_counter() - start
        count = len(files)
    else:
        from facepipe.data.align.job import AlignSettings, run_align

        detect = args.case.startswith("detect")
        max_side = 640 if args.case == "detect640" else 1024
        settings = AlignSettings(detector_model=str(MODEL) if detect else None, max_side=max_side)
        marks = args.landmarks if args.case == "landmarks" else None
        start = time.perf_counter()
        result = run_align(
            args.src,
            args.out,
            settings,
            landmarks_file=marks,
            workers=args.workers,
            chunk_size=100,
            contact_sheet=False,
        )
        seconds = time.perf_counter() - start
        count = result["inputs"]
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest finished worker
    print(json.dumps({"images": count, "seconds": seconds, "peak_rss_mb": max(own, children) / 1024}))


def measure(case: str, src: Path, landmarks: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--src", str(src), "--landmarks", str(landmarks)]
    cmd += ["--out", str(out), "--workers", str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{case} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", choices=["baseline", "detect", "detect640", "landmarks"])
    parser.add_argument("--src")
    parser.add_argument("--landmarks")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        args.case = args.child
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_align_") as tmp:
        tmp = Path(tmp)
        src, marks = build_folder(tmp, args.images)
        big_src, big_marks = build_folder(tmp, 4 * args.images)
        for path in src.rglob("*"):  # warm the page cache so the first run does not pay for disk reads
            if path.is_file():
                path.read_bytes()
        base = measure("baseline", src, marks, tmp / "unused", 1)
        detect = measure("detect", src, marks, tmp / "out_detect", args.workers) if MODEL.is_file() else None
        fast = measure("detect640", src, marks, tmp / "out_640", args.workers) if MODEL.is_file() else None
        small = measure("landmarks", src, marks, tmp / "out_small", args.workers)
        large = measure("landmarks", big_src, big_marks, tmp / "out_large", args.workers)
    baseline_rate = base["images"] / base["seconds"]
    images_s = detect["images"] / detect["seconds"] if detect else None
    report = {
        "images": args.images,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "real_photos": MODEL.is_file(),
        "images_s": round(images_s, 1) if images_s else None,
        "images_s_max_side_640": round(fast["images"] / fast["seconds"], 1) if fast else None,
        "images_s_landmarks": round(small["images"] / small["seconds"], 1),
        "images_s_landmarks_large": round(large["images"] / large["seconds"], 1),
        "baseline_images_s": round(baseline_rate, 1),
        "ratio_vs_baseline": round(images_s / (baseline_rate * args.workers), 3) if images_s else None,
        "ratio_landmarks_vs_baseline": round(
            small["images"] / small["seconds"] / (baseline_rate * args.workers), 3
        ),
        "peak_rss_mb": round(detect["peak_rss_mb"] if detect else small["peak_rss_mb"], 1),
        "peak_rss_mb_small": round(small["peak_rss_mb"], 1),
        "peak_rss_mb_large": round(large["peak_rss_mb"], 1),
        "large_images": 4 * args.images,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
