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


def test_one_synth_config_the_section_is_what_the_generator_takes():
    from facepipe import config as C
    from facepipe.data.synth import generate, spec

    assert generate.SynthConfig is spec.SynthConfig is C.SynthConfig
    synth = load_config(None, ["synth.identities=20", "synth.relative_fraction=0.5"]).synth
    assert synth.pair_sets == (C.SYNTH_VAL, C.SYNTH_HARD) and synth.num_verification_identities == 500
    spec_keys = list(synth.to_dict())  # the manifest's `config`: the bytes' settings only, in this order
    assert spec_keys == [
        "identities", "images_per_identity", "pairs", "seed", "size",
        "relative_fraction", "relative_groups", "verification_identities", "pair_sets",
    ]  # fmt: skip
    written = synth.to_dict()
    assert written["relative_fraction"] == 0.5 and written["pair_sets"][0]["name"] == "synth_val"
    assert load_config(None, ["synth.protocols="]).synth.protocol_kinds == ()


@pytest.mark.parametrize(
    "override, message",
    [
        ("synth.identities=1", "need at least 2 identities"),
        ("synth.images_per_identity=0", "need at least 1 image per identity"),
        ("synth.pairs=21", "pairs must be an even number >= 20"),
        ("synth.size=16", "size must be at least 32 pixels"),
        ("synth.workers=-1", "workers must be >= 0"),
        ("synth.protocols=ijb,faces", "protocols takes ijb, video, ijb,video or nothing"),
        ("synth.protocol_subjects=1", "protocol_subjects must be >= 2"),
    ],
)
def test_synth_settings_are_checked(override, message):
    with pytest.raises(FacepipeError, match=message):
        load_config(None, [override])
