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
    from pydantic import BaseModel

    from facepipe.config import Config

    key, sep, _ = token.partition("=")
    if not sep or token.startswith("-"):
        return False
    model: type[BaseModel] = Config
    parts = key.strip().split(".")
    for depth, part in enumerate(parts, 1):
        field = model.model_fields.get(part)
        if field is None:
            return False
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            model = kind  # a section: the key goes on
            continue
        # a plain key ends the path; a mapping (`extra`, `heads`) takes any keys below it
        return depth == len(parts) or getattr(kind, "__origin__", None) is dict
    return False  # a whole section is not a key


def _gather_overrides(args: argparse.Namespace, argv: list[str], leftovers: list[str]) -> str | None:
    """Put overrides from anywhere on the line into `args.overrides`; the error for anything else.

    argparse fills a trailing `overrides` positional only before the first option, and an optional
    positional (register's SOURCE) swallows an override, so both are collected here, in line order
    (a later override wins).
    """
    unknown = [t for t in leftovers if not is_override(t)]
    if unknown:
        bad = next((t for t in unknown if "=" in t and not t.startswith("-")), None)
        if bad is not None:
            return f"{bad.partition('=')[0]!r} is not a configuration key (override {bad!r})"
        return f"unrecognized arguments: {' '.join(unknown)}"
    if not hasattr(args, "overrides"):
        return f"this command takes no configuration overrides: {' '.join(leftovers)}" if leftovers else None
    found = list(args.overrides) + leftovers
    for name, value in vars(args).items():
        if name != "overrides" and isinstance(value, str) and is_override(value):
            setattr(args, name, None)  # an optional positional that caught an override
            found.append(value)
    # line order; stable for a token given twice
    args.overrides = sorted(found, key=lambda t: argv.index(t) if t in argv else len(argv))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, leftovers = parser.parse_known_args(argv)
    problem = _gather_overrides(args, argv, leftovers)
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
