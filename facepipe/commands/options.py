"""One command style for every stage: `facepipe <stage> [--config params.yaml] [section.key=value …]`.

A stage's parser comes from `stage_parser` (which adds `--config FILE`, alias `--params`) and ends with
`finish` (the `section.key=value` positional and the run function). A flag that stands for a
configuration key is declared once with `config_flag(parser, "--workers", key="decode.workers", ...)`:
its type and choices come from the key's field in `facepipe.config`, its default is the configuration's
(argparse's default is None: "not given"), and `--help` names the key it sets.

`load(args)` gives the run's configuration. Precedence, highest first:

    a flag  >  a section.key=value override (a later one beats an earlier one)  >  --config FILE
    (default ./params.yaml when present)  >  the built-in defaults

so `facepipe decode SRC OUT --workers 3` is `facepipe decode SRC OUT decode.workers=3`, and
`--workers 3 decode.workers=5` runs with 3 workers. Overrides may stand anywhere on the line:
`split_overrides` takes them out of the line before argparse sees it.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from facepipe.errors import FacepipeError

FLAGS = "config_flags"  # namespace attribute: {dest: configuration key} of the parser's config flags
CONFIG_HELP = "parameters file (default: ./params.yaml if present, else the built-in defaults)"
FLAG_NOTE = "a flag marked [sets KEY] is KEY=VALUE, and wins over --config and over the overrides"


def stage_parser(
    subparsers: argparse._SubParsersAction,
    name: str,
    help: str,
    description: str,
    epilog: str | None = None,
    *,
    raw: bool = False,
) -> argparse.ArgumentParser:
    """The parser of one stage with `--config FILE` (alias `--params`); end it with `finish`."""
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter,
    )
    add_config_option(parser)
    return parser


def add_config_option(parser: argparse.ArgumentParser, help: str = CONFIG_HELP) -> None:
    parser.add_argument("--config", "--params", dest="config", metavar="FILE", default=None, help=help)


def finish(parser: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]) -> None:
    """The trailing `section.key=value` overrides (after the stage's own positionals) and `func`."""
    add_overrides(parser)
    parser.set_defaults(func=func)


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help=f"configuration overrides, anywhere on the line; {FLAG_NOTE}",
    )


def config_field(key: str) -> Any | None:
    """The annotation of configuration key `section.key` (None: not a key, or a whole section).

    A mapping (`extra`, `heads`) takes any key below it: its annotation is returned for those too.
    """
    from pydantic import BaseModel

    from facepipe.config import Config

    model: type[BaseModel] = Config
    parts = key.strip().split(".")
    for depth, part in enumerate(parts, 1):
        field = model.model_fields.get(part)
        if field is None:
            return None
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            model = kind  # a section: the key goes on
            continue
        if depth == len(parts) or getattr(kind, "__origin__", None) is dict:
            return kind
        return None
    return None  # a whole section is not a key


def is_override(token: str) -> bool:
    """Whether `token` is `section.key=value` naming a key of the config (a path holding `=` is not)."""
    key, sep, _ = token.partition("=")
    return bool(sep) and not token.startswith("-") and config_field(key) is not None


def looks_like_override(token: str) -> bool:
    """`name.key=value` (or a top-level key's name before `=`): meant as an override, known key or not."""
    key, sep, _ = token.partition("=")
    if not sep or token.startswith("-") or not re.fullmatch(r"[A-Za-z_]\w*(\.[\w-]+)*", key):
        return False
    from facepipe.config import Config

    return "." in key or key in Config.model_fields


def config_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *flags: str,
    key: str,
    help: str,
    const: Any = None,
    **kwargs: Any,
) -> argparse.Action:
    """A flag that sets configuration key `key`; type and choices come from the key's field.

    A bool key gets `--flag` / `--no-flag` (or, with `const`, one flag that sets that value).
    """
    kind = config_field(key)
    if kind is None:
        raise ValueError(f"{key} is not a configuration key")
    kind, choices = _plain_type(kind)
    if const is not None:
        kwargs |= {"action": "store_const", "const": const}
    elif kind is bool:
        kwargs |= {"action": argparse.BooleanOptionalAction}
    else:
        kwargs.setdefault("type", kind)
        if choices:
            kwargs.setdefault("choices", choices)
    sets = key if const is None else f"{key}={yaml_scalar(const)}"
    action = parser.add_argument(*flags, default=None, help=f"{help} [sets {sets}]", **kwargs)
    known = dict(parser.get_default(FLAGS) or {})
    parser.set_defaults(**{FLAGS: {**known, action.dest: key}})
    return action


def _plain_type(kind: Any) -> tuple[Any, list[Any] | None]:
    """(the type argparse converts to, the choices) of a field annotation: `X | None` -> X, Literal."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        plain = [a for a in args if a is not type(None)]
        kind = float if set(plain) == {int, float} else plain[0]
        args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Literal:
        return type(args[0]), list(args)
    return kind, None


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The config flags given on the line, as `key=value` overrides (values written as YAML)."""
    out = []
    for dest, key in (getattr(args, FLAGS, None) or {}).items():
        value = getattr(args, dest, None)
        if value is not None:
            out.append(f"{key}={yaml_scalar(value)}")
    return out


def yaml_scalar(value: Any) -> str:
    """`value` as one line of YAML that reads back as the same value (a string stays a string)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def load(args: argparse.Namespace) -> Any:
    """The configuration of this run: --config FILE, then the overrides, then the flags (see above)."""
    from pydantic import ValidationError

    from facepipe.config import load_config

    overrides = [*(getattr(args, "overrides", None) or []), *flag_overrides(args)]
    try:
        return load_config(getattr(args, "config", None), overrides)
    except FacepipeError as err:
        if isinstance(err.__cause__, ValidationError):
            where = f" ({args.config})" if getattr(args, "config", None) else ""
            raise FacepipeError(f"invalid configuration{where}: {describe(err.__cause__)}") from None
        raise


def describe(err: Any) -> str:
    """A pydantic ValidationError in one line: `key: problem (got value)` for each error."""
    parts = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        got = f" (got {item['input']!r})" if item["type"] != "extra_forbidden" and "input" in item else ""
        parts.append(f"{key}: {message}{got}")
    return "; ".join(parts)


def split_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the line without its overrides, the overrides in line order, unknown keys included).

    argparse would give an override to a positional (SRC, OUT, register's SOURCE) or to a
    multi-value option (`--models A B seed=1`), so they are taken out first. A token that is the
    value of an option (`--name x=1`) stays; after `--` everything stays.
    """
    rest: list[str] = []
    found: list[str] = []
    current = parser
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--":
            rest += tokens[i - 1 :]
            break
        if token.startswith("-") and len(token) > 1:
            rest.append(token)
            takes = _values_taken(current, token)
            rest += tokens[i : i + takes]
            i += takes
        elif looks_like_override(token):  # an unknown key too: the caller names it
            found.append(token)
        else:
            rest.append(token)
            current = _subparser(current, token) or current
    return rest, found


def _values_taken(parser: argparse.ArgumentParser, token: str) -> int:
    """How many of the following tokens are option `token`'s value(s) (0 for `--opt=value`, flags,
    and options of several values, which end at the next option or override anyway)."""
    if "=" in token:
        return 0
    actions = parser._option_string_actions
    action = actions.get(token)
    if action is None and token.startswith("--"):  # argparse accepts a unique prefix
        matches = {a for s, a in actions.items() if s.startswith(token)}
        action = matches.pop() if len(matches) == 1 else None
    if action is None or action.nargs in (0, "*", "+", argparse.REMAINDER):
        return 0
    return action.nargs if isinstance(action.nargs, int) else 1


def _subparser(parser: argparse.ArgumentParser, token: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and token in action.choices:
            return action.choices[token]
    return None
