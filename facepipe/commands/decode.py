"""`facepipe decode SRC [SRC ...] OUT`: InsightFace RecordIO + verification .bin → Parquet shards."""

from __future__ import annotations

import argparse
import os

from facepipe.commands import options
from facepipe.data.decode.hashing import DEFAULT_SOURCE_HASH
from facepipe.data.formats.image_header import add_max_pixels_option
from facepipe.errors import FacepipeError

HELP = "convert InsightFace .rec/.idx/property and *.bin folders into Parquet shards"

DESCRIPTION = """\
Convert one or more InsightFace dataset folders (train.rec, train.idx, property, any *.bin) into
OUT/train/part-NNNNN.parquet shards, OUT/pairs/<name>.parquet pair tables and OUT/manifest.json. Several
sources are combined with disjoint label ranges. Rerunning after an interruption resumes where it
stopped."""


def register(subparsers) -> None:
    parser = options.stage_parser(subparsers, "decode", HELP, DESCRIPTION)
    parser.usage = "facepipe decode [options] SRC [SRC ...] OUT [section.key=value ...]"
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="source folders (or .rec files), then the output folder"
    )
    options.config_flag(
        parser, "--target-mb", key="decode.target_mb", type=float, help="MB of source records per shard"
    )
    options.config_flag(parser, "--workers", key="decode.workers", help="parallel processes")
    options.config_flag(
        parser,
        "--validate",
        key="decode.validate_images",
        help="decode every image: a bad one stops the run (or is rejected with --skip-bad)",
    )
    add_max_pixels_option(parser)
    options.config_flag(
        parser,
        "--skip-bad",
        key="decode.skip_bad",
        help="record bad records in OUT/rejects.parquet and go on",
    )
    options.config_flag(
        parser,
        "--color-order",
        key="decode.color_order",
        help="colour order the model takes, recorded in the manifest (RGB, as InsightFace models)",
    )
    parser.add_argument("--row-group-mb", type=float, default=None, help="row group size (default 4)")
    parser.add_argument(
        "--address",
        default=None,
        help="convert the ranges as Ray tasks on this cluster (host:port, auto, ray://host:10001)",
    )
    options.config_flag(
        parser,
        "--source-hash",
        key="decode.source_hash",
        help=(
            f"digest of each source file recorded in the manifest ({DEFAULT_SOURCE_HASH}: fast, "
            "not cryptographic; shards always get sha256)"
        ),
    )
    options.finish(parser, run)


def run(args: argparse.Namespace) -> int:
    from facepipe.data.dataset import Dataset
    from facepipe.data.decode.job import decode_dataset
    from facepipe.progress import summary

    if len(args.paths) < 2:
        raise FacepipeError("give at least one SRC and then OUT")
    *sources, out = args.paths
    config = options.load(args).decode
    manifest = decode_dataset(
        sources,
        out,
        target_bytes=max(1, int(config.target_mb * (1 << 20))),
        workers=max(1, config.workers),
        validate=config.validate_images,
        skip_bad=config.skip_bad,
        color_order=config.color_order,
        row_group_bytes=int(args.row_group_mb * (1 << 20)) if args.row_group_mb else None,
        source_hash=config.source_hash,
        max_pixels=args.max_pixels,
        ray_address=args.address,
    )
    dataset = Dataset.at(out)  # where the layout puts each part (a folder or a URI)
    shard_bytes = sum(s["bytes"] for s in manifest["shards"])
    lines = {
        "images": manifest["num_images"],
        "classes": manifest["num_classes"],
        "image size": "x".join(map(str, manifest["image_size"] or ["?"])),
        "colour order": manifest["color_order"],
        "shards": f"{len(manifest['shards'])} in {dataset.train_dir} ({shard_bytes / 1e6:.1f} MB)",
        "resumed": f"{manifest['_run']['skipped_shards']} shards already done",
        "pair tables": ", ".join(f"{k} ({v['pairs']} pairs)" for k, v in manifest["pairs"].items()) or "none",
        "rejects": manifest["rejects"]["count"],
        "manifest": dataset.manifest_path,
    }
    for src in manifest["sources"]:
        first = src["label_offset"]
        lines[f"source {src['dataset']}"] = (
            f"{src['num_images']} images, labels {first}..{first + src['num_classes'] - 1}"
        )
    print(summary("facepipe decode: done", lines))
    if manifest["num_images"] == 0:  # shards, pair tables and rejects are written; the run still failed
        rejected = manifest["rejects"]["count"]
        where = f": every record was rejected ({rejected}, see {os.path.join(out, 'rejects.parquet')})"
        raise FacepipeError(
            f"the training set is empty{where if rejected else ''}; fix or replace the source and run again"
        )
    return 0
