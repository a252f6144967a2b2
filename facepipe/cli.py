"""The single `facepipe` command: one sub-command per pipeline stage.

Each stage registers itself from `facepipe.commands.<name>` (a `register(subparsers)` function that
adds its parser and sets `func`). Command modules import their heavy dependencies lazily, so
`facepipe --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from facepipe.errors import FacepipeError

# Order is the order shown in --help: the pipeline's stages, then the whole job.
COMMANDS = ["synth", "decode", "align", "train", "evaluate", "export", "register", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facepipe", description="Uncertainty-aware face recognition: data, training, evaluation."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"facepipe.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"facepipe.commands.{name}":
                continue  # stage not built into this version
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        result = args.func(args)
    except FacepipeError as err:
        print(f"facepipe {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
