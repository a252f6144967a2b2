"""The one `facepipe` command: help works and user errors exit 2 without a traceback."""

import subprocess
import sys

from facepipe.cli import main
from facepipe.errors import DataError


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "facepipe", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "facepipe" in out.stdout


def test_data_error_names_file_and_record():
    err = DataError("bad magic", path="/x/train.rec", record=17)
    assert "/x/train.rec" in str(err) and "17" in str(err)


def test_user_error_exits_2(capsys, monkeypatch):
    import argparse

    from facepipe import cli

    def boom(args):
        raise DataError("truncated", path="a.rec", record=3)

    parser = argparse.ArgumentParser()
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(func=boom, command="decode")
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert main([]) == 2
    assert "a.rec" in capsys.readouterr().err


# --- one command style: --config FILE, section.key=value anywhere, flags as shortcuts for keys ---------

import argparse  # noqa: E402
import typing  # noqa: E402

import pytest  # noqa: E402

from facepipe import cli  # noqa: E402
from facepipe.commands import options  # noqa: E402
from facepipe.config import Config, load_config  # noqa: E402

# the least each stage needs on its line besides the flag under test
REQUIRED = {
    ("synth",): ["OUT"],
    ("decode",): ["SRC", "OUT"],
    ("align",): ["SRC", "OUT"],
    ("train", "backbone"): [],
    ("train", "uncertainty"): [],
    ("train", "finetune"): [],
    ("protocol",): ["lfw", "SRC", "OUT"],
    ("verify",): ["A", "B", "--model", "M"],
    ("embed",): ["FOLDER", "--model", "M", "--out", "X.parquet"],
    ("compare",): ["--models", "M", "--shards", "S", "--out", "O"],
    ("export",): ["--checkpoint", "B", "--out", "m.onnx"],
    ("register",): ["backbone"],
    ("evaluate",): ["--features", "F", "--out", "O"],
}


def leaf_parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    out, stack = {}, [((), cli.build_parser())]
    while stack:
        path, parser = stack.pop()
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out[path] = parser
        for sub in subs:
            stack += [((*path, name), child) for name, child in sub.choices.items()]
    return out


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """cli.main with every command's run replaced by one that records its namespace; no params.yaml."""
    monkeypatch.chdir(tmp_path)
    seen: list[argparse.Namespace] = []
    factory = cli.build_parser

    def build() -> argparse.ArgumentParser:
        parser = factory()
        stack = [parser]
        while stack:
            p = stack.pop()
            p.set_defaults(func=lambda args: seen.append(args) or 0)
            stack += [
                c for a in p._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices.values()
            ]
        return parser

    monkeypatch.setattr(cli, "build_parser", build)

    def parse(argv: list[str]) -> argparse.Namespace:
        assert cli.main(argv) == 0, argv
        return seen[-1]

    return parse


def key_value(config: Config, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


# keys whose validation refuses the plain samples below
VALID = {"synth.pairs": (40, 60), "synth.size": (64, 48), "synth.protocols": ("video", "")}


def sample_values(action: argparse.Action, key: str) -> list[tuple[list[str], object, object]]:
    """(flag tokens, the value the key must get, another value an earlier override gives the key)."""
    if action.nargs == 0:  # --flag / --no-flag, or a flag with a constant
        if action.const is not None:
            return [([action.option_strings[0]], action.const, not action.const)]
        return [([s], not s.startswith("--no-"), s.startswith("--no-")) for s in action.option_strings]
    if action.choices:
        first, last = list(action.choices)[0], list(action.choices)[-1]
        return [([action.option_strings[0], last], last, first)]
    kind = options._plain_type(options.config_field(key))[0]
    plain = {int: (7, 8), float: (0.25, 0.5), str: ("some/place:1 #x", "elsewhere")}
    value, other = VALID.get(key) or plain[kind]
    return [([action.option_strings[0], str(value)], value, other)]


def test_every_stage_takes_config_and_overrides():
    parsers = leaf_parsers()
    assert set(REQUIRED) == set(parsers) - {("demo",)}, "add the new command to REQUIRED"
    for path, parser in parsers.items():
        strings = {s for a in parser._actions for s in a.option_strings}
        assert {"--config", "--params"} <= strings, path
        if path != ("demo",):
            assert "overrides" in {a.dest for a in parser._actions}, path


def test_each_config_flag_sets_its_key_as_the_override_does(recorded):
    checked = 0
    for path, parser in leaf_parsers().items():
        flags = parser.get_default(options.FLAGS) or {}
        assert all(options.config_field(key) is not None for key in flags.values()), path
        for action in parser._actions:
            key = flags.get(action.dest)
            if key is None:
                continue
            assert f"[sets {key}" in action.help  # --help names the key
            for tokens, value, other in sample_values(action, key):
                earlier = f"{key}={options.yaml_scalar(other)}"  # the flag beats it
                by_flag = options.load(recorded([*path, *REQUIRED[path], earlier, *tokens]))
                override = f"{key}={options.yaml_scalar(value)}"
                by_override = options.load(recorded([*path, *REQUIRED[path], earlier, override]))
                assert key_value(by_flag, key) == value != other, (path, tokens)
                assert by_flag == by_override, (path, tokens)
                checked += 1
    # synth 8, decode 6 (+2 --no-), align 4, train 2+3+4, protocol 2, verify 2, embed 2
    assert checked >= 35


def test_decode_workers_flag_is_the_override(recorded):
    flag = recorded(["decode", "SRC", "OUT", "--workers", "3"])
    override = recorded(["decode", "SRC", "OUT", "decode.workers=3"])
    assert flag.paths == override.paths == ["SRC", "OUT"]
    assert options.load(flag) == options.load(override) and options.load(flag).decode.workers == 3


def test_precedence_flag_then_later_override_then_config_file_then_defaults(recorded, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("decode:\n  workers: 5\n  color_order: BGR\n")
    line = ["decode", "SRC", "OUT"]

    def workers(*extra: str) -> int:
        return options.load(recorded([*line, *extra])).decode.workers

    assert workers() == Config().decode.workers == 2  # no params.yaml here: the built-in default
    assert workers("--config", str(params)) == 5
    assert workers("--params", str(params)) == 5  # the old name of --config
    assert workers("--config", str(params), "decode.workers=4") == 4
    assert workers("decode.workers=4", "--config", str(params), "decode.workers=6") == 6  # later wins
    assert workers("--config", str(params), "decode.workers=4", "--workers", "3") == 3
    assert workers("--workers", "3", "decode.workers=4", "--config", str(params)) == 3  # flag wins anywhere
    (tmp_path / "params.yaml").write_text("decode:\n  workers: 9\n")
    assert workers() == 9  # ./params.yaml when present
    both = options.load(recorded([*line, "--config", str(params), "--workers", "1"])).decode
    assert (both.workers, both.color_order) == (1, "BGR")  # a flag changes only its key


def test_overrides_between_positionals_and_after_multi_value_options(recorded):
    args = recorded(["align", "seed=3", "SRC", "align.workers=1", "OUT", "--template", "probface"])
    assert (args.src, args.out, args.overrides) == ("SRC", "OUT", ["seed=3", "align.workers=1"])
    config = options.load(args)
    assert (config.seed, config.align.workers, config.align.template) == (3, 1, "probface")
    args = recorded(["compare", "--models", "a", "b", "seed=2", "--shards", "S", "--out", "O"])
    assert args.models == ["a", "b"] and args.overrides == ["seed=2"]
    args = recorded(["train", "backbone", "--name", "seed=1", "--address", "auto"])
    assert args.name == "seed=1" and args.overrides == []  # an option's value stays its value
    assert args.address == "auto" and options.load(args).train_backbone.scaling.address == "auto"
    args = recorded(["embed", "F", "--model", "M", "--out", "X", "--params", "p.yaml"])
    assert args.config == "p.yaml"


def test_a_flag_value_stays_the_string_it_was(recorded):
    for text in ("null", "yes", "1e3", "[a]", "a: b", "#c", "~"):
        args = recorded(["align", "SRC", "OUT", "--detector-model", text])
        assert options.load(args).align.detector_model == text


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["decode", "SRC", "OUT", "decode.workerz=3"],
            "'decode.workerz' is not a configuration key (override 'decode.workerz=3')",
        ),
        (["decode", "SRC", "OUT", "decode.workers=many"], "invalid configuration: decode.workers: "),
        (["synth", "OUT", "synth.pairs=7"], "synth.pairs: pairs must be an even number >= 20"),
        (["synth", "OUT", "--pairs", "7"], "synth.pairs: pairs must be an even number >= 20"),
        (["align", "SRC", "OUT", "align.template=round"], "align.template: Input should be 'arcface'"),
        (
            ["verify", "A", "B", "--model", "M", "--config", "absent.yaml"],
            "cannot read configuration absent.yaml",
        ),
        (["export", "--checkpoint", "B", "--out", "m.onnx", "synth=3"], "'synth' is not a configuration key"),
    ],
)
def test_a_bad_override_is_one_line_without_traceback(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"facepipe {argv[0]}: error: ") and message in err, err
    assert not (tmp_path / "OUT").exists()


def test_help_names_the_key_each_flag_sets(capsys):
    with pytest.raises(SystemExit):
        cli.main(["decode", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--workers WORKERS parallel processes [sets decode.workers]" in text
    assert "[sets decode.validate_images]" in text and "--config FILE, --params FILE" in text


def test_flag_types_come_from_the_config_fields():
    assert options._plain_type(typing.Literal["a", "b"]) == (str, ["a", "b"])
    assert options._plain_type(int | float) == (float, None)
    assert options._plain_type(str | None) == (str, None)
    assert load_config(None, ["decode.target_mb=0.01"]).decode.target_mb == 0.01
    with pytest.raises(ValueError, match="not a configuration key"):
        options.config_flag(argparse.ArgumentParser(), "--x", key="decode.nothing", help="x")
