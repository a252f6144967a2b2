"""The typed configuration: params.yaml round-trips, overrides apply, typos are errors."""

from pathlib import Path

import pytest

from facepipe.config import Config, dump_config, flatten, load_config
from facepipe.errors import FacepipeError

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_yaml_matches_the_typed_defaults():
    # params.yaml is the single source of parameters: it must load and hold every section.
    config = load_config(REPO / "params.yaml")
    assert isinstance(config, Config)
    assert config.model_dump().keys() == Config().model_dump().keys()


def test_overrides_are_parsed_as_yaml(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(dump_config(Config()))
    config = load_config(
        params,
        ["train_backbone.epochs=3", "eval.rejection_rates=[0, 0.5]", "train_backbone.scaling.address=auto"],
    )
    assert config.train_backbone.epochs == 3
    assert config.eval.rejection_rates == [0.0, 0.5]
    assert config.train_backbone.scaling.address == "auto"


def test_unknown_key_is_an_error_naming_it(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train_backbone:\n  epoch: 3\n")
    with pytest.raises(FacepipeError, match="epoch"):
        load_config(params)


def test_malformed_override_is_an_error():
    with pytest.raises(FacepipeError, match="section.key=value"):
        load_config(None, ["no-equals-sign"])


def test_flatten_gives_dotted_keys():
    flat = flatten(Config())
    assert flat["train_backbone.margin.name"] == Config().train_backbone.margin.name
    assert all(not isinstance(v, dict) or not v for v in flat.values())
