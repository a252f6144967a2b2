"""`facepipe align SRC OUT`: image folders (or shards of unaligned images) into aligned training shards."""

from __future__ import annotations

import argparse

from facepipe.commands import options
from facepipe.data.formats.image_header import add_max_pixels_option

_DESCRIPTION = """\
Align every face of SRC to a 5-point template and write training shards that the
train stage reads like decoded .rec shards.

SRC is a folder of identity folders (identity = folder name; labels 0..C-1 in sorted
name order) or a folder of Parquet shards with key, label, image (and optionally
landmarks). Images listed in --landmarks are aligned from those points; the others
are detected with YuNet, keeping the largest, most central face. An image with no
usable face goes to OUT/rejects.parquet with the reason: the run never stops on one
bad image. Re-running the same command resumes an interrupted job; re-running a
finished one does nothing."""

_EPILOG = """\
writes:
  OUT/train/part-*.parquet   aligned crops, landmarks, detector score, source path
  OUT/rejects.parquet        images without a usable face, with the reason
  OUT/labels.json            identity name -> label (names escaped losslessly, see README)
  OUT/manifest.json          counts, settings, shard checksums (written last)
  OUT/contact_sheet.png      a grid of crops with the template points, to check by eye
  OUT/pairs/<name>.parquet   with --pairs: verification pairs of aligned crops

examples:
  facepipe align photos/ data/aligned --detector-model models/face_detection_yunet_2023mar.onnx
  facepipe align lfw/ data/lfw_aligned --landmarks lfw_landmark.txt --pairs pairs.txt
"""


HELP = "detect and align faces from image folders into training shards"


def register(subparsers) -> None:
    parser = options.stage_parser(subparsers, "align", HELP, _DESCRIPTION, _EPILOG, raw=True)
    parser.add_argument(
        "src", metavar="SRC", help="image folder (one sub-folder per identity) or Parquet shards"
    )
    parser.add_argument("out", metavar="OUT", help="output folder (must not lie inside SRC)")

    faces = parser.add_argument_group("landmarks and detection")
    faces.add_argument(
        "--landmarks",
        metavar="FILE",
        help="5-point landmarks, one '<path relative to SRC> x1 y1 ... x5 y5' line per image "
        "(e.g. lfw_landmark.txt); listed images are aligned without detection",
    )
    options.config_flag(
        faces,
        "--detector-model",
        key="align.detector_model",
        metavar="PATH",
        help="YuNet ONNX model for images without landmarks (required when any image lacks landmarks)",
    )
    options.config_flag(
        faces,
        "--min-score",
        key="align.min_score",
        metavar="S",
        help="reject faces the detector scores below S",
    )
    faces.add_argument(
        "--max-side",
        type=int,
        default=1024,
        metavar="PX",
        help="shrink images to this longest side before detection (default: %(default)s)",
    )
    add_max_pixels_option(faces)

    output = parser.add_argument_group("output")
    options.config_flag(
        output,
        "--template",
        key="align.template",
        help="arcface 112x112, sphereface 112x96 (HxW), probface 96x96",
    )
    output.add_argument(
        "--format", choices=["jpg", "png"], default="jpg", help="encoding of the crops (default: %(default)s)"
    )
    output.add_argument(
        "--quality", type=int, default=95, metavar="Q", help="JPEG quality (default: %(default)s)"
    )
    output.add_argument(
        "--target-mb",
        type=int,
        default=256,
        metavar="MB",
        help="approximate shard size (default: %(default)s)",
    )
    output.add_argument(
        "--dataset", default="", metavar="NAME", help="dataset name stored in each row (default: SRC's name)"
    )
    output.add_argument(
        "--pairs",
        action="append",
        default=[],
        metavar="FILE",
        help="verification pairs ('path_a path_b 0|1' lines, or LFW pairs.txt) to write as "
        "OUT/pairs/<name>.parquet of aligned crops; repeatable",
    )
    output.add_argument(
        "--contact-sheet",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write OUT/contact_sheet.png, a grid of aligned crops to check by eye (default: on)",
    )

    execution = parser.add_argument_group("execution")
    options.config_flag(execution, "--workers", key="align.workers", metavar="N", help="parallel processes")
    execution.add_argument(
        "--chunk-size", type=int, default=500, metavar="N", help="images per work unit (default: %(default)s)"
    )
    execution.add_argument(
        "--executor",
        choices=["processes", "ray"],
        default="processes",
        help="run chunks in local processes or as Ray tasks (default: %(default)s)",
    )
    execution.add_argument(
        "--ray-address", metavar="ADDR", help="Ray cluster for --executor ray (default: start a local Ray)"
    )
    options.finish(parser, run)


def run(args: argparse.Namespace) -> int:
    from facepipe.data.align.job import AlignSettings, run_align
    from facepipe.errors import FacepipeError
    from facepipe.progress import summary

    config = options.load(args).align
    workers = config.workers
    for flag, value, low, high in (
        ("--workers", workers, 1, None),
        ("--chunk-size", args.chunk_size, 1, None),
        ("--target-mb", args.target_mb, 1, None),
        ("--max-side", args.max_side, 32, None),
        ("--max-pixels", args.max_pixels, 1, None),
        ("--quality", args.quality, 1, 100),
    ):
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise FacepipeError(f"{flag} must be {bounds}, not {value}")
    settings = AlignSettings(
        **config.model_dump(include={"template", "detector_model", "min_score"}),
        max_side=args.max_side,
        image_format=args.format,
        jpeg_quality=args.quality,
        dataset=args.dataset,
        max_pixels=args.max_pixels,
    )
    result = run_align(
        args.src,
        args.out,
        settings,
        landmarks_file=args.landmarks,
        workers=workers,
        chunk_size=args.chunk_size,
        target_bytes=args.target_mb << 20,
        contact_sheet=args.contact_sheet,
        executor=args.executor,
        pairs_files=args.pairs,
        ray_address=args.ray_address,
    )
    lines = {
        "output": result["out"],
        "images in": result["inputs"],
        "aligned": f"{result['aligned']} ({result['detected']} detected, "
        f"{result['from_landmarks']} from landmarks)",
        "rejected": f"{result['rejected']} {result['reasons'] or ''}".strip(),
        "classes": result["classes"],
        "shards": f"{result['shards']} in {result['out']}/train",
    }
    if result.get("skipped"):
        lines["note"] = "already complete; nothing was redone"
    else:
        lines["seconds"] = result["seconds"]
    print(summary("facepipe align: done", lines))
    return 0
