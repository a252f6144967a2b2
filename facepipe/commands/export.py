"""`facepipe export`: a trained backbone (and its uncertainty head) to ONNX or TorchScript.

    facepipe export --checkpoint BUNDLE_OR_MODEL_DIR --out model.onnx [--format onnx|torchscript]
                    [--head HEAD_DIR] [--backbone-only] [--opset 17]

The exported model takes an image batch (N, 3, H, W) in the backbone's input size and colour order and
returns the embedding, plus σ² (PFE, ProbFace) or κ (SCF) when a head is exported. The file is checked
against the eager model before the command reports success.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from facepipe.commands import options

HELP = "export a trained backbone (+ uncertainty head) to ONNX or TorchScript"

DESCRIPTION = """\
Export a backbone bundle (bundle.json; a folder that holds one, e.g. MLflow model artifacts, works too)
and, when present or given with --head, its uncertainty head, to ONNX (default) or TorchScript; the
result is checked against the eager model."""


def register(subparsers) -> None:
    parser = options.stage_parser(subparsers, "export", HELP, DESCRIPTION)
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="backbone bundle or a folder holding one"
    )
    parser.add_argument("--out", type=Path, required=True, help="output file (.onnx or .pt)")
    parser.add_argument(
        "--format",
        choices=["onnx", "torchscript"],
        default=None,
        help="default: from --out's suffix (.onnx → onnx, else torchscript)",
    )
    parser.add_argument(
        "--head", type=Path, default=None, help="uncertainty head folder (head.json + head.pt)"
    )
    parser.add_argument(
        "--backbone-only", action="store_true", help="export the backbone even if a head is found"
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    options.finish(parser, run)


def run(args: argparse.Namespace) -> int:
    from facepipe.models.export import export_checkpoint
    from facepipe.progress import summary

    options.load(args)  # reads no key today; a bad --config or override still stops here, as everywhere
    fmt = args.format or ("onnx" if args.out.suffix == ".onnx" else "torchscript")
    result = export_checkpoint(
        args.checkpoint, args.out, fmt=fmt, head=args.head, backbone_only=args.backbone_only, opset=args.opset
    )
    h, w = result["input_size"]
    outputs = (
        "embedding"
        if result["method"] is None
        else f"embedding, {'κ' if result['method'] == 'scf' else 'σ²'}"
    )
    print(
        summary(
            "facepipe export",
            {
                "wrote": result["path"],
                "format": result["format"],
                "backbone": f"{result['backbone']} from {result['bundle']}",
                "head": f"{result['method']} from {result['head']}" if result["head"] else "none",
                "outputs": outputs,
                "input": f"(N, 3, {h}, {w}) {result['color_order']}",
                "max error vs eager": f"{result['max_error_vs_eager']:.2g}",
            },
        )
    )
    return 0
