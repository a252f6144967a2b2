"""`facepipe synth OUT`: write the generated sample dataset (InsightFace layout) into OUT."""

from __future__ import annotations

import argparse
import os

from facepipe.commands import options

# The defaults are the `synth` section's (params.yaml, else facepipe.config.SynthConfig): 1,000
# identities x 15 images (15k training images, ~60 MB) render in a few minutes on two cores and are
# enough for a CPU-sized backbone to learn the task in minutes; 3,000 pairs per verification set give
# 10 folds of 300, as in LFW.


HELP = "generate a sample dataset of face-like identities in the InsightFace layout"

DESCRIPTION = """\
Write train.rec/train.idx/property, verification .bin files, degradation sidecars (Parquet),
synth_manifest.json with pixel/HOG baselines, and samples.png into OUT."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = options.stage_parser(subparsers, "synth", HELP, DESCRIPTION)
    parser.add_argument("out", metavar="OUT", help="output folder (created if needed)")
    for flag, help_text in (
        ("--identities", "training identities"),
        ("--images-per-identity", "images of each training identity"),
        ("--pairs", "pairs per verification set (even)"),
        ("--seed", "random seed"),
        ("--size", "image side in pixels"),
        ("--workers", "render processes (0: one per CPU core)"),
        (
            "--protocols",
            "also write template/video protocol sets: 'ijb', 'video' or 'ijb,video' ('' for none; release "
            "layouts under OUT/ijb, OUT/ytf, read into OUT/protocols/{ijb,video} for `facepipe evaluate "
            "--protocol`)",
        ),
        ("--protocol-subjects", "identities in each protocol set (>= 2)"),
    ):
        options.config_flag(parser, flag, key=f"synth.{flag[2:].replace('-', '_')}", help=help_text)
    parser.add_argument(
        "--protocols-only", action="store_true", help="write only the protocol sets, not the dataset"
    )
    parser.add_argument(
        "--force", action="store_true", help="regenerate everything (default: keep stages already written)"
    )
    options.finish(parser, run)


def run(args: argparse.Namespace) -> int:
    from facepipe.cores import available_cores
    from facepipe.data.synth.generate import generate
    from facepipe.errors import FacepipeError
    from facepipe.progress import summary

    cfg = options.load(args).synth
    workers = cfg.workers or available_cores()
    kinds = cfg.protocol_kinds
    if args.protocols_only and not kinds:
        raise FacepipeError("--protocols-only needs --protocols (synth.protocols) ijb, video or ijb,video")
    lines: dict[str, object] = {"folder": os.path.abspath(args.out)}
    if kinds:
        from facepipe.data.synth.protocols import write_protocols

        for kind, info in write_protocols(args.out, cfg, kinds, cfg.protocol_subjects).items():
            counts = ", ".join(f"{v} {k}" for k, v in info.items() if k != "tables")
            lines[f"{kind} protocol"] = f"{counts} -> {info['tables']}"
    if args.protocols_only:
        print(summary("facepipe synth: wrote", lines))
        return 0
    manifest = generate(args.out, cfg, workers=workers, force=args.force)
    lines |= {
        "training set": f"{manifest['train']['images']} images of {manifest['train']['classes']} identities "
        f"(train.rec/.idx, property, degradation.parquet)",
    }
    for name, info in manifest["verification"].items():
        base = info["baselines"]
        lines[f"{name}.bin"] = (
            f"{info['pairs']} pairs ({info['hard_negatives']} relatives as negatives, "
            f"{info['clean_pairs']} clean, {info['degraded_pairs']} degraded); "
            f"pixel {base['pixel_cosine_acc']:.3f}, HOG {base['hog_cosine_acc']:.3f}"
        )
    lines["manifest"] = "synth_manifest.json"
    lines["samples"] = manifest["samples_png"]
    lines["seconds"] = manifest["seconds"]
    print(summary("facepipe synth: wrote", lines))
    return 0
