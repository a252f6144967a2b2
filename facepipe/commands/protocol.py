"""`facepipe protocol lfw|ijb|ytf SRC OUT`: an evaluation release layout -> facepipe's protocol tables.

    facepipe protocol lfw ROOT OUT --pairs pairs.txt [--landmarks lfw_landmark.txt] [--detector-model M]
    facepipe protocol ijb IJBC_ROOT OUT                        (loose_crop/ + meta/ijbc_*)
    facepipe protocol ytf FRAMES OUT --splits splits.txt [--landmarks FILE] [--max-frames 32]

Every image goes through the align stage's aligner; OUT is then scored with
`facepipe evaluate --model M --shards OUT` (lfw) or `--protocol OUT` (ijb, ytf).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from facepipe.commands import options

HELP = "read an LFW / IJB-B/C / YTF release layout into aligned pair or template tables"

DESCRIPTION = """\
Align the images of an evaluation release (with its 5-point landmarks, else a detector) and write the
tables `facepipe evaluate` reads: OUT/pairs/<name>.parquet for LFW, OUT/images.parquet +
template_pairs/gallery/probe tables for IJB, frames + video pairs for YTF."""


def register(subparsers) -> None:
    parser = options.stage_parser(subparsers, "protocol", HELP, DESCRIPTION)
    parser.add_argument("layout", choices=("lfw", "ijb", "ytf"))
    parser.add_argument(
        "src", type=Path, help="image folder (lfw), release root (ijb) or frames folder (ytf)"
    )
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--pairs", type=Path, help="lfw: pairs.txt")
    parser.add_argument("--splits", type=Path, help="ytf: splits.txt")
    parser.add_argument("--landmarks", type=Path, help="lfw/ytf: 5-point landmark file")
    options.config_flag(
        parser, "--detector-model", key="align.detector_model", help="YuNet ONNX for images without landmarks"
    )
    options.config_flag(parser, "--template", key="align.template", help="alignment template")
    parser.add_argument(
        "--max-frames", type=int, default=None, help="ytf: frames kept per video (evenly spaced)"
    )
    options.finish(parser, run)


def run(args: argparse.Namespace) -> int:
    from facepipe.errors import FacepipeError
    from facepipe.progress import summary

    align = options.load(args).align
    if args.layout == "lfw":
        from facepipe.data.protocols.lfw import read_lfw

        if args.pairs is None:
            raise FacepipeError("protocol lfw needs --pairs pairs.txt")
        info = read_lfw(args.src, args.pairs, args.out, args.landmarks, align.template, align.detector_model)
        lines = {"pairs": f"{info['pairs']} of {info['listed']} listed ({info['left_out']} left out)"}
    elif args.layout == "ijb":
        from facepipe.data.protocols.ijb import read_ijb

        info = read_ijb(args.src, args.out, align.template)
        lines = {k: info[k] for k in ("images", "templates", "pairs") if k in info}
    else:
        from facepipe.data.protocols.ytf import read_ytf

        if args.splits is None:
            raise FacepipeError("protocol ytf needs --splits splits.txt")
        info = read_ytf(
            args.src,
            args.splits,
            args.out,
            args.landmarks,
            max_frames=args.max_frames,
            template=align.template,
            detector_model=align.detector_model,
        )
        lines = {k: info[k] for k in ("videos", "frames", "pairs", "left_out")}
    lines["rejected"] = len(info.get("rejected", {}))
    lines["folder"] = str(args.out)
    print(summary(f"facepipe protocol {args.layout}: wrote", lines))
    return 0
