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

from facepipe.commands.options import split_overrides
from facepipe.errors import FacepipeError

# Order is the order shown in --help: the pipeline's stages, then the whole job.
COMMANDS = [
    "synth",
    "decode",
    "align",
    "train",
    "evaluate",
    "protocol",
    "compare",
    "export",
    "register",
    "verify",
    "embed",
    "demo",
]


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


def is_override(token: str) -> bool:
    """Whether `token` is a configuration override: `section.key=value` naming a key of the config.

    Only a known key counts, so a path or an option's value that happens to hold `=` is not taken.
    """
    from facepipe.commands.options import is_override as known_override

    return known_override(token)


def _gather_overrides(
    args: argparse.Namespace, argv: list[str], found: list[str], leftovers: list[str]
) -> str | None:
    """Put the overrides taken from the line (`found`) into `args.overrides`; the error for anything else.

    `found` holds every token meant as an override (`options.split_overrides`), so an unknown key is
    named here; they join `args.overrides` in line order (a later override wins).
    """
    given = list(getattr(args, "overrides", None) or [])  # a positional's tokens; demo's --set values
    unknown = [t for t in [*found, *given, *leftovers] if not is_override(t)]
    bad = next((t for t in unknown if "=" in t and not t.startswith("-")), None)
    if bad is not None:
        return f"{bad.partition('=')[0]!r} is not a configuration key (override {bad!r})"
    if unknown:
        return f"unrecognized arguments: {' '.join(unknown)}"
    tokens = [*given, *found, *leftovers]
    if not hasattr(args, "overrides"):
        return f"this command takes no configuration overrides: {' '.join(tokens)}" if tokens else None
    # line order; stable for a token given twice
    args.overrides = sorted(tokens, key=lambda t: argv.index(t) if t in argv else len(argv))
    return None


def parse_line(argv: list[str]) -> tuple[argparse.Namespace, str | None]:
    """The command line as `main` reads it: the parsed arguments, with the overrides from anywhere on
    the line in `args.overrides`, and the problem with the line (None when it is fine). argparse
    still exits on an unknown option or a bad value."""
    parser = build_parser()
    line, found = split_overrides(parser, argv)
    args, leftovers = parser.parse_known_args(line)
    return args, _gather_overrides(args, argv, found, leftovers)


def main(argv: list[str] | None = None) -> int:
    args, problem = parse_line(list(sys.argv[1:] if argv is None else argv))
    if problem is not None:
        print(f"facepipe {args.command}: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # No user-facing traceback: one line saying what is wrong and where; the traceback only with -v.
    try:
        result = args.func(args)
    except FacepipeError as err:
        return _fail(args, str(err), 2)
    except KeyboardInterrupt:
        return _fail(args, "interrupted; run the same command again to resume", 130)
    except Exception as err:  # noqa: BLE001 - anything unforeseen still ends in one clear line
        hint = "" if args.verbose else "; run again with -v for the traceback"
        return _fail(args, f"{_describe(err)}{hint}", 1)
    return int(result or 0)


def _describe(err: BaseException) -> str:
    """An unexpected exception in one line: its type, message and, for OS errors, the file."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.strerror or type(err).__name__} (file {err.filename})"
    if isinstance(err, MemoryError):
        return "out of memory (MemoryError); use fewer --workers or a smaller input"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if args.verbose:
        logging.getLogger("facepipe").exception("traceback of the error below")
    one_line = " ".join(message.split())  # an exception's text may span lines (pyarrow, numpy)
    print(f"facepipe {args.command}: error: {one_line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
