"""`register --show` lists aliases; overrides go anywhere on the line; each margin head has its defaults."""

from __future__ import annotations

import argparse
import re

import pytest

from facepipe import cli
from facepipe.config import load_config
from facepipe.models.registry import build_margin_head
from facepipe.train.backbone import margin_head_kwargs

# --- (a) register --show ----------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path):
    """Two versions of facepipe-backbone on a real MLflow SQLite store; v1 champion, v2 challenger."""
    from mlflow import MlflowClient

    from facepipe import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlc = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not a URI an earlier test set globally
    experiment = mlc.create_experiment("show-test", artifact_location=str(tmp_path / "artifacts"))
    name = tracking.model_name("backbone")
    mlc.create_registered_model(name)
    runs = []
    for accuracy in (0.91, 0.87):
        run = mlc.create_run(experiment)
        mlc.set_terminated(run.info.run_id)
        model_dir = tmp_path / f"model-{len(runs)}"
        model_dir.mkdir()
        mlc.create_model_version(
            name,
            str(model_dir),
            run_id=run.info.run_id,
            tags={tracking.METRIC_TAG + "accuracy": str(accuracy)},
        )
        runs.append(run.info.run_id)
    mlc.set_registered_model_alias(name, tracking.CHAMPION, "1")
    mlc.set_registered_model_alias(name, tracking.CHALLENGER, "2")
    return uri, runs


def test_show_lists_versions_with_aliases(registry, tmp_path, monkeypatch, capsys):
    uri, runs = registry
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the defaults plus the override
    assert cli.main(["register", "backbone", "--show", f"tracking.tracking_uri={uri}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("facepipe-backbone: 2 version(s)")
    v2, v1 = lines[1:]  # newest first
    assert re.search(r"\bv2\b.*aliases=challenger\b", v2) and runs[1] in v2 and "accuracy=0.87" in v2
    assert re.search(r"\bv1\b.*aliases=champion\b", v1) and runs[0] in v1 and "accuracy=0.91" in v1
    assert re.search(r"created=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", v1)


def test_show_takes_an_override_before_the_option_not_as_source(registry, tmp_path, monkeypatch, capsys):
    uri, _ = registry
    monkeypatch.chdir(tmp_path)
    assert cli.main(["register", "backbone", f"tracking.tracking_uri={uri}", "--show"]) == 0
    assert "aliases=champion" in capsys.readouterr().out


def test_show_of_a_missing_model_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    assert cli.main(["register", "backbone", "--show", f"tracking.tracking_uri={uri}"]) == 2
    # MLflow's own INFO lines (creating the tables) come first; the error is the one last line
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("facepipe register: error: no registered model 'facepipe-backbone'")


# --- (b) overrides anywhere -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token, expected",
    [
        ("tracking.tracking_uri=sqlite:///x.db", True),
        ("train_backbone.margin.m=0.5", True),
        ("train_backbone.margin.extra.m2=0.3", True),  # a mapping takes any key below it
        ("train_backbone.margin.heads.adaface.h=0.5", True),
        ("seed=3", True),
        ("train_backbone.margin=3", False),  # a section, not a key
        ("train_backbone.epoch=3", False),  # typo
        ("runs/a=b/bundle", False),  # a path holding '='
        ("--metric=accuracy=1", False),
        ("tracking.tracking_uri", False),
    ],
)
def test_is_override(token, expected):
    assert cli.is_override(token) is expected


@pytest.fixture
def captured(monkeypatch):
    """Each command's run function replaced by one that records its namespace."""
    seen: dict = {}

    parser_factory = cli.build_parser

    def record(args: argparse.Namespace) -> int:
        seen["args"] = args
        return 0

    def build() -> argparse.ArgumentParser:
        parser = parser_factory()
        stack = [parser]
        while stack:  # train's stages are sub-parsers of their own
            p = stack.pop()
            p.set_defaults(func=record)
            stack += [
                c for a in p._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices.values()
            ]
        return parser

    monkeypatch.setattr(cli, "build_parser", build)
    return seen


@pytest.mark.parametrize(
    "argv, overrides, source",
    [
        (["register", "backbone", "--show", "seed=1"], ["seed=1"], None),
        (["register", "backbone", "seed=1", "--show", "seed=2"], ["seed=1", "seed=2"], None),
        (
            ["register", "backbone", "b", "seed=1", "--champion", "3", "tracking.experiment=x"],
            ["seed=1", "tracking.experiment=x"],
            "b",
        ),
        (
            [
                "train",
                "backbone",
                "--config",
                "p.yaml",
                "seed=1",
                "--address",
                "auto",
                "train_backbone.epochs=2",
            ],
            ["seed=1", "train_backbone.epochs=2"],
            None,
        ),
    ],
)
def test_overrides_anywhere_in_line_order(captured, argv, overrides, source):
    assert cli.main(argv) == 0
    args = captured["args"]
    assert args.overrides == overrides
    assert getattr(args, "source", None) == source


def test_unknown_tokens_are_one_line_errors(captured, capsys):
    assert cli.main(["register", "backbone", "--show", "train_backbone.epoch=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "facepipe register: error: 'train_backbone.epoch' is not a configuration key "
        "(override 'train_backbone.epoch=3')"
    )
    assert cli.main(["register", "backbone", "--show", "stray"]) == 2
    assert capsys.readouterr().err.strip() == "facepipe register: error: unrecognized arguments: stray"
    assert "args" not in captured


# --- (c) per-head margin defaults -------------------------------------------------------------------


def _head(overrides: list[str], config_path=None):
    margin = load_config(config_path, overrides).train_backbone.margin
    return build_margin_head(margin.name, **margin_head_kwargs(margin.name, margin.s, margin.m, margin.extra))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("arcface", {"s": 64.0, "m": 0.5}),
        ("cosface", {"s": 64.0, "m": 0.4}),  # CosFace paper / arcface_torch (METHODS.md)
        ("sphereface", {"m": 4}),
        ("a_softmax", {"m": 4}),
        ("adaface", {"s": 64.0, "m": 0.4, "h": 0.333}),
        ("curricularface", {"s": 64.0, "m": 0.5}),
        ("combined", {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0}),
    ],
)
def test_each_head_gets_its_paper_defaults(tmp_path, monkeypatch, name, expected):
    monkeypatch.chdir(tmp_path)  # no params.yaml: nothing set but the name
    head = _head([f"train_backbone.margin.name={name}"])
    assert {k: getattr(head, k) for k in expected} == expected


def test_explicit_margin_overrides_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    head = _head(
        ["train_backbone.margin.name=arcface", "train_backbone.margin.m=0.3", "train_backbone.margin.s=32"]
    )
    assert (head.s, head.m) == (32.0, 0.3)
    assert _head(["train_backbone.margin.name=sphereface", "train_backbone.margin.m=2"]).m == 2


def test_params_yaml_cosface_settings_stay_with_cosface():
    from tests.conftest import REPO

    params = REPO / "params.yaml"
    cos = _head([], params)
    assert (type(cos).__name__, cos.s, cos.m) == ("CosFace", 30.0, 0.35)
    # switching head on the command line does not carry CosFace's tuned m=0.35 along
    assert _head(["train_backbone.margin.name=sphereface"], params).m == 4
    arc = _head(["train_backbone.margin.name=arcface"], params)
    assert (arc.s, arc.m) == (64.0, 0.5)
    # an explicit key beats the head's own entry
    assert _head(["train_backbone.margin.m=0.2"], params).m == 0.2


def test_per_head_entry_extras_reach_only_that_head(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entry = "train_backbone.margin.heads.adaface={h: 0.5, s: 32}"
    head = _head(["train_backbone.margin.name=adaface", entry])
    assert (head.h, head.s, head.m) == (0.5, 32.0, 0.4)
    assert _head(["train_backbone.margin.name=arcface", entry]).s == 64.0


def test_a_softmax_refuses_a_fractional_margin():
    with pytest.raises(ValueError, match="whole number"):
        build_margin_head("sphereface", m=0.35)
