"""Peak memory of `facepipe align` on a folder with a pixel bomb vs the same folder without it.

A pixel bomb is a small file whose header declares a huge image: here a 1-bit PNG of 30000x30000
pixels in about 110 KB, which a decoder turns into 2.7 GB of BGR pixels. Align reads the size from the
header and refuses it before decoding, so peak memory must stay within 10% of the run without it.

Prints one JSON object: peak_rss_mb_without / peak_rss_mb_with (largest resident set of the align
process, one worker, each run in a fresh child process), ratio, bomb_bytes and the bomb's reject reason.
Usage: python bench/align_pixel_bomb.py [--images 200]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def pixel_bomb_png(side: int = 30000) -> bytes:
    """A real, decodable 1-bit greyscale PNG of side x side pixels (all black), about 110 KB."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def build_folder(root: Path, images: int) -> tuple[Path, Path]:
    """`images` generated 400x400 photos in identity folders of 10, and their landmark file."""
    import cv2
    import numpy as np

    from facepipe.data.align.job import TEMPLATES

    src = root / "src"
    points = np.array(TEMPLATES["arcface"].points) * 3 + 40
    rng = np.random.default_rng(0)
    lines = []
    for i in range(images):
        rel = f"id{i // 10:04d}/{i:05d}.jpg"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(src / rel), rng.integers(0, 255, (400, 400, 3), dtype=np.uint8))
        lines.append(rel + " " + " ".join(f"{v:.2f}" for v in points.ravel()))
    marks = root / "landmarks.txt"
    marks.write_text("\n".join(lines) + "\n")
    return src, marks


def child(src: str, marks: str, out: str) -> None:
    from facepipe.data.align.job import AlignSettings, run_align

    result = run_align(src, out, AlignSettings(), landmarks_file=marks, workers=1, contact_sheet=False)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": round(peak_kb / 1024, 1), "reasons": result["reasons"]}))


def measure(src: Path, marks: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(src), str(marks), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="facepipe-bomb-") as tmp:
        root = Path(tmp)
        src, marks = build_folder(root, args.images)
        without = measure(src, marks, root / "out_without")
        bombed = root / "src_bomb"
        shutil.copytree(src, bombed)
        bomb = pixel_bomb_png()
        (bombed / "id0000" / "bomb.png").write_bytes(bomb)
        marks_bomb = root / "landmarks_bomb.txt"
        marks_bomb.write_text(marks.read_text() + "id0000/bomb.png" + " 50" * 10 + "\n")
        with_bomb = measure(bombed, marks_bomb, root / "out_with")
    print(
        json.dumps(
            {
                "images": args.images,
                "bomb_bytes": len(bomb),
                "peak_rss_mb_without": without["peak_rss_mb"],
                "peak_rss_mb_with": with_bomb["peak_rss_mb"],
                "ratio": round(with_bomb["peak_rss_mb"] / without["peak_rss_mb"], 3),
                "reasons_with": with_bomb["reasons"],
            }
        )
    )


if __name__ == "__main__":
    main()
