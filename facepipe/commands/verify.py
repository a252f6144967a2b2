"""`facepipe verify A.jpg B.jpg --model URI`: are two photos the same person, by a registered model?"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from facepipe.commands import options

_DESCRIPTION = """\
Detect the main face of each photo (YuNet, as the align stage does), align it to the
model's template, embed it, and compare the two: the score (cosine, or the model's
uncertainty-aware score), each face's uncertainty, and a decision at the threshold
stored with the registered version for the chosen FAR. A pair is "uncertain — rejected"
when either face's uncertainty is above the stored rejection threshold."""

_EPILOG = """\
examples:
  facepipe verify a.jpg b.jpg --model models:/facepipe-probface@champion
  facepipe verify a.jpg b.jpg --model runs/probface/model --threshold 0.3 --json
"""

DECISION_TEXT = {"same": "same person", "different": "different people", "rejected": "uncertain — rejected"}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --detector-model, --min-score: shared by verify and embed."""
    parser.add_argument(
        "--model",
        required=True,
        help="registered model URI (models:/facepipe-probface@champion) or a local model folder",
    )
    options.config_flag(
        parser,
        "--detector-model",
        key="align.detector_model",
        metavar="PATH",
        help="YuNet ONNX model (when unset: the one registered with the model)",
    )
    options.config_flag(
        parser, "--min-score", key="align.min_score", metavar="S", help="minimum detector score"
    )


HELP = "compare the faces of two photos with a registered model"


def register(subparsers) -> None:
    parser = options.stage_parser(subparsers, "verify", HELP, _DESCRIPTION, _EPILOG, raw=True)
    parser.add_argument("image_a", metavar="A", type=Path, help="first photo")
    parser.add_argument("image_b", metavar="B", type=Path, help="second photo")
    add_model_options(parser)
    parser.add_argument(
        "--far", type=float, default=1e-3, help="false accept rate of the stored threshold (default: 1e-3)"
    )
    parser.add_argument("--threshold", type=float, help="score threshold to use instead of the stored one")
    parser.add_argument(
        "--risk-threshold", type=float, help="uncertainty above which a pair is rejected (default: stored)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options.finish(parser, run)


@contextlib.contextmanager
def open_model(source: str, config: Any) -> Iterator[tuple[Any, dict[str, str], Path | None]]:
    """(FaceModel, operating-point tags, the detector registered with it or None) for a URI or folder."""
    import tempfile

    from facepipe import tracking
    from facepipe.models.operating import read_point_file
    from facepipe.models.photo import FaceModel

    with tempfile.TemporaryDirectory(prefix="facepipe-model-") as tmp:
        if "://" in source or source.startswith(("models:/", "runs:/")):
            local = tracking.download_model(source, config.tracking, tmp)
            tags = tracking.operating_point_tags(source, config.tracking)
        else:
            local = Path(source)
            tags = read_point_file(local) if local.is_dir() else {}
        yield FaceModel(local), tags, registered_detector(local)


def registered_detector(folder: Path) -> Path | None:
    """The YuNet model logged as the pyfunc's `detector` artifact (from its MLmodel file), or None."""
    import yaml

    for mlmodel in sorted(folder.rglob("MLmodel")) if folder.is_dir() else []:
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        path = (flavor.get("artifacts") or {}).get("detector", {}).get("path")
        if path and (mlmodel.parent / path).is_file():
            return mlmodel.parent / path
    return None


def make_aligner(config: Any, model: Any, registered: Path | None) -> Any:
    """The photo aligner: --detector-model / align.detector_model, else the model's registered one."""
    from facepipe.models.photo import PhotoAligner, detector_path

    configured = config.align.detector_model or (str(registered) if registered else None)
    return PhotoAligner(detector_path(None, configured), model.input_size, config.align.min_score)


def run(args: argparse.Namespace) -> int:
    from facepipe.models.operating import decide, pick
    from facepipe.models.photo import read_photo

    config = options.load(args)
    with open_model(args.model, config) as (model, tags, registered):
        if args.threshold is not None:
            threshold, risk, far = args.threshold, args.risk_threshold, None
        else:  # before any photo is read: a model without a stored threshold fails at once
            (threshold, risk), far = pick(tags, args.far), args.far
            risk = args.risk_threshold if args.risk_threshold is not None else risk
        aligner = make_aligner(config, model, registered)
        faces = [aligner.align(read_photo(p), str(p)) for p in (args.image_a, args.image_b)]
        out = model.embed(model.to_input([f.crop for f in faces]))
        u = out["u"]
        emb = out["embedding"]
        score = float(
            model.score(emb[:1], None if u is None else u[:1], emb[1:], None if u is None else u[1:])[0]
        )
    unc_a, unc_b = (float(x) for x in out["uncertainty"])
    decision = decide(score, unc_a, unc_b, threshold, risk)
    result = {
        "score": score,
        "uncertainty_a": _finite(unc_a),
        "uncertainty_b": _finite(unc_b),
        "decision": decision,
        "threshold": threshold,
        "far": far,
        "risk_threshold": risk,
        "score_name": model.score_name,
        "detection_score_a": faces[0].score,
        "detection_score_b": faces[1].score,
        "model": args.model,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    from facepipe.progress import summary

    def unc(value: float | None) -> str:
        return "n/a (no uncertainty head)" if value is None else f"{value:.4g}"

    lines = {
        "score": f"{score:.4f} ({model.score_name})",
        f"uncertainty {args.image_a.name}": unc(result["uncertainty_a"]),
        f"uncertainty {args.image_b.name}": unc(result["uncertainty_b"]),
        "threshold": f"{threshold:.4f}" + (f" (FAR {far:g})" if far is not None else " (given)"),
        "rejection threshold": "none" if risk is None else f"{risk:.4g}",
        "decision": DECISION_TEXT[decision],
    }
    print(summary(f"facepipe verify: {args.image_a} vs {args.image_b}", lines))
    return 0


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
