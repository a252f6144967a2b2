"""`facepipe synth OUT`: write the generated sample dataset (InsightFace layout) into OUT."""

from __future__ import annotations

import argparse
import os

# Defaults: 1,000 identities x 15 images (15k training images, ~60 MB) render in a few minutes on two
# cores and are enough for a CPU-sized backbone to learn the task in minutes; 3,000 pairs per
# verification set give 10 folds of 300, as in LFW.
DEFAULT_IDENTITIES = 1000
DEFAULT_IMAGES = 15
DEFAULT_PAIRS = 3000


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="generate a sample dataset of face-like identities in the InsightFace layout",
        description=(
            "Write train.rec/train.idx/property, verification .bin files, degradation sidecars "
            "(Parquet), synth_manifest.json with pixel/HOG baselines, and samples.png into OUT."
        ),
    )
    parser.add_argument("out", metavar="OUT", help="output folder (created if needed)")
    parser.add_argument("--identities", type=int, default=DEFAULT_IDENTITIES, help="training identities")
    parser.add_argument("--images-per-identity", type=int, default=DEFAULT_IMAGES)
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, help="pairs per verification set (even)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=112, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=0, help="render processes (0: one per CPU core)")
    parser.add_argument(
        "--protocols",
        default="",
        help="also write template/video protocol sets: 'ijb', 'video' or 'ijb,video' (release layouts under "
        "OUT/ijb, OUT/ytf, read into OUT/protocols/{ijb,video} for `facepipe evaluate --protocol`)",
    )
    parser.add_argument(
        "--protocol-subjects", type=int, default=20, help="identities in each protocol set (>= 2)"
    )
    parser.add_argument(
        "--protocols-only", action="store_true", help="write only the --protocols sets, not the dataset"
    )
    parser.add_argument(
        "--force", action="store_true", help="regenerate everything (default: keep stages already written)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from facepipe.data.synth.generate import SynthConfig, generate
    from facepipe.errors import FacepipeError
    from facepipe.progress import summary

    try:
        cfg = SynthConfig(
            identities=args.identities,
            images_per_identity=args.images_per_identity,
            pairs=args.pairs,
            seed=args.seed,
            size=args.size,
        )
    except ValueError as err:
        raise FacepipeError(str(err)) from None
    if args.workers < 0:
        raise FacepipeError("--workers must be >= 0")
    workers = args.workers or os.cpu_count() or 1
    kinds = tuple(k.strip() for k in args.protocols.split(",") if k.strip())
    if any(k not in ("ijb", "video") for k in kinds) or (args.protocols_only and not kinds):
        raise FacepipeError(f"--protocols takes ijb, video or ijb,video, not {args.protocols!r}")
    if args.protocol_subjects < 2:
        raise FacepipeError("--protocol-subjects must be >= 2")
    lines: dict[str, object] = {"folder": os.path.abspath(args.out)}
    if kinds:
        from facepipe.data.synth.protocols import write_protocols

        for kind, info in write_protocols(args.out, cfg, kinds, args.protocol_subjects).items():
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
