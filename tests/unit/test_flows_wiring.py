"""The flows are wired to what exists: prefect.yaml's entrypoints, parameters and schedules, the
completed-stage check and retry rules of flows.stages (running real facepipe commands), and the rule
that facepipe itself never imports Prefect."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from facepipe.config import load_config
from facepipe.orchestration import stage_cache
from facepipe.orchestration.settings import FlowSettings, absolute_tracking_uri, scaling_overrides
from facepipe.orchestration.stage_process import StageFailed
from flows.stages import retry_unless_user_error, run_stage

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = yaml.safe_load((REPO / "prefect.yaml").read_text())
REQUIRED_FLOWS = {
    "ingest",
    "train-backbone",
    "train-pfe",
    "train-probface",
    "train-scf",
    "benchmark",
    "pipeline",
}


def load_entrypoint(entrypoint: str):
    path, _, attr = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, attr)


# ------------------------------------------------------------------------------------ prefect.yaml


def test_every_deployment_points_at_a_flow_with_matching_parameters():
    from prefect import Flow

    names = set()
    for dep in PREFECT_YAML["deployments"]:
        flow = load_entrypoint(dep["entrypoint"])
        assert isinstance(flow, Flow), dep["entrypoint"]
        names.add(f"{flow.name}/{dep['name']}")
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(dep.get("parameters", {})) <= accepted, (dep["entrypoint"], dep["parameters"])
        assert dep["work_pool"]["name"] in {"facepipe-process", "facepipe-kubernetes"}
        if dep["work_pool"]["name"] == "facepipe-kubernetes":
            assert (
                dep["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
                == "/opt/facepipe"
            )
            assert (
                dep["work_pool"]["job_variables"]["image"]
                == "facepipe:" + importlib.import_module("facepipe").__version__
            )
    assert {f"{f}/local" for f in REQUIRED_FLOWS} <= names
    assert {"train-probface/kubernetes", "pipeline/kubernetes"} <= names


def test_train_probface_retrains_on_a_valid_cron_schedule():
    from prefect.client.schemas.schedules import CronSchedule

    probface = [d for d in PREFECT_YAML["deployments"] if d["entrypoint"].endswith(":train_probface")]
    assert {d["work_pool"]["name"] for d in probface} == {"facepipe-process", "facepipe-kubernetes"}
    for dep in probface:
        (schedule,) = dep["schedules"]
        CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad cron/timezone
        assert schedule["active"] is True


def test_cluster_overrides_are_valid_configuration():
    for dep in PREFECT_YAML["deployments"]:
        overrides = dep.get("parameters", {}).get("overrides")
        if overrides:
            load_config(REPO / "params.yaml", overrides)


def test_flow_names_and_scaling_parameters():
    from facepipe.uncertainty.registry import method_names
    from flows.evaluate import benchmark
    from flows.ingest import ingest
    from flows.pipeline import pipeline
    from flows.train import HEAD_FLOWS, train_backbone

    flows_ = [ingest, train_backbone, *HEAD_FLOWS.values(), benchmark, pipeline]
    # one head flow per registered method (the deployed ones are REQUIRED_FLOWS)
    assert {f.name for f in flows_} == REQUIRED_FLOWS | {f"train-{m}" for m in method_names()}
    for f in (train_backbone, *HEAD_FLOWS.values(), pipeline):
        params = inspect.signature(f.fn).parameters
        assert {"ray_address", "workdir", "params", "overrides"} <= set(params)
    assert {"methods", "num_workers", "use_gpu"} <= set(inspect.signature(pipeline.fn).parameters)
    assert train_backbone.retries >= 1 and ingest.retries >= 1


def test_facepipe_never_imports_prefect():
    offenders = []
    for path in (REPO / "facepipe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in ("prefect", "flows")]
    assert not offenders


# ------------------------------------------------------------------------------------ settings


def test_flow_settings_pass_the_same_config_to_every_command(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    extra = scaling_overrides("train_backbone", "ray://head:10001", 3, False)
    s = FlowSettings(str(tmp_path), "params.yaml", ["decode.workers=1", *extra])
    assert s.params == str(tmp_path / "params.yaml")
    assert s.config.train_backbone.scaling.address == "ray://head:10001"
    assert s.config.train_backbone.scaling.num_workers == 3
    assert s.config.decode.workers == 1
    args = s.config_args()
    # relative paths and a relative sqlite tracking URI are pinned to the workdir: Ray workers run in
    # another directory
    assert args[: 3 + len(extra)] == ["--config", s.params, "decode.workers=1", *extra]
    assert args[-1] == f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"
    assert f"paths.shards={tmp_path}/data/shards" in args
    assert s.config.tracking.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert s.config.paths.features == f"{tmp_path}/data/features"
    # settings built again from their own overrides are the same (flows hand them to subflows)
    again = FlowSettings(s.workdir, s.params, s.overrides)
    assert again.overrides == s.overrides
    # where training runs does not change what it computes: the address is not part of the fingerprint
    assert "address" not in s.section("train_backbone")["scaling"]
    assert scaling_overrides("train_uncertainty", None, None, None) == []
    # nor part of a stage's fingerprint: the same work on another cluster is the same work
    elsewhere = FlowSettings(
        str(tmp_path),
        "params.yaml",
        ["decode.workers=1", *scaling_overrides("train_backbone", "auto", 3, False)],
    )

    def fp(x: FlowSettings, extra: list[str] = []) -> str:  # noqa: B006
        return stage_cache.fingerprint(x.config_args() + extra, x.section("train_backbone"), [], tmp_path)

    assert fp(s) == fp(elsewhere)
    assert fp(s) != fp(s, ["seed=1"])


def test_flow_settings_reject_a_bad_override(tmp_path):
    from facepipe.errors import FacepipeError

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    with pytest.raises(FacepipeError):
        FlowSettings(str(tmp_path), "params.yaml", ["decode.no_such_key=1"])


def test_absolute_tracking_uri(tmp_path):
    assert absolute_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////x/m.db", tmp_path) == "sqlite:////x/m.db"
    assert absolute_tracking_uri("http://mlflow:5000", tmp_path) == "http://mlflow:5000"


def test_headline_picks_the_main_numbers():
    from flows.pipeline import headline

    metrics = {"name": "lfw", "insightface": {"accuracy": 0.9, "std": 0.01, "val": 0.5, "thresholds": [1, 2]},
               "risk": {"0.3": {"accuracy": 0.95}}, "n_pairs": 6000}  # fmt: skip
    expected = {"insightface.accuracy": 0.9, "insightface.std": 0.01, "insightface.val": 0.5}
    assert headline(metrics) == {**expected, "risk.0.3.accuracy": 0.95}


# ------------------------------------------------------------------------ stages: real commands


@pytest.fixture()
def features_file(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    pairs = 200
    issame = np.arange(pairs) % 2 == 0
    a = rng.normal(size=(pairs, 16))
    b = np.where(issame[:, None], a + 0.3 * rng.normal(size=a.shape), rng.normal(size=a.shape))
    emb = np.empty((2 * pairs, 16))
    emb[0::2], emb[1::2] = a, b
    path = tmp_path / "feats.npz"
    np.savez(path, embeddings=emb, issame=issame)
    return path


@pytest.mark.slow  # five real `facepipe evaluate` runs
def test_run_stage_runs_once_then_skips_until_inputs_change(tmp_path, features_file):
    argv = ["evaluate", "--features", str(features_file), "--out", "report", "--folds", "5"]
    first = run_stage.fn(
        "eval", argv, str(tmp_path), deps=[str(features_file)], outs=["report"], params={"a": 1}
    )
    assert not first["skipped"]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["insightface"]["accuracy"] > 0.8
    marker = json.loads((tmp_path / stage_cache.STATE_DIR / "eval.json").read_text())
    assert marker["fingerprint"] == first["fingerprint"] and marker["argv"] == argv
    assert (tmp_path / stage_cache.LOG_DIR / "eval.log").read_text()

    again = run_stage.fn(
        "eval", argv, str(tmp_path), deps=[str(features_file)], outs=["report"], params={"a": 1}
    )
    assert again["skipped"] and again["fingerprint"] == first["fingerprint"]

    changed = run_stage.fn(
        "eval", argv, str(tmp_path), deps=[str(features_file)], outs=["report"], params={"a": 2}
    )
    assert not changed["skipped"]

    np.savez(features_file, **{k: v for k, v in np.load(features_file).items()}, extra=np.zeros(1))
    dep_changed = run_stage.fn(
        "eval", argv, str(tmp_path), deps=[str(features_file)], outs=["report"], params={"a": 2}
    )
    assert not dep_changed["skipped"]

    (tmp_path / "report" / "metrics.json").unlink()
    (tmp_path / "report").rename(tmp_path / "gone")
    missing_out = run_stage.fn(
        "eval", argv, str(tmp_path), deps=[str(features_file)], outs=["report"], params={"a": 2}
    )
    assert not missing_out["skipped"] and (tmp_path / "report" / "metrics.json").is_file()


def test_user_error_fails_without_retry_and_leaves_no_marker(tmp_path):
    with pytest.raises(StageFailed) as err:
        run_stage.fn("decode", ["decode", str(tmp_path / "absent"), "out"], str(tmp_path))
    assert err.value.permanent and err.value.returncode == 2
    assert "absent" in str(err.value)
    assert not (tmp_path / stage_cache.STATE_DIR / "decode.json").exists()


def test_retry_condition_retries_crashes_but_not_user_errors(tmp_path):
    from prefect.states import Completed, Failed

    log = tmp_path / "x.log"
    user = Failed(data=StageFailed("s", 2, "bad input", log))
    crash = Failed(data=StageFailed("s", -9, "killed", log))
    other = Failed(data=ConnectionError("lost the Ray head"))
    assert retry_unless_user_error(None, None, user) is False
    assert retry_unless_user_error(None, None, crash) is True
    assert retry_unless_user_error(None, None, other) is True
    assert retry_unless_user_error(None, None, Completed(data=1)) is True


def test_path_state_prefers_dvc_then_manifest(tmp_path):
    data = tmp_path / "raw"
    data.mkdir()
    (data / "a.bin").write_bytes(b"1")
    listed = stage_cache.path_state(data)
    assert "dir" in listed
    (data / "manifest.json").write_text("{}")
    assert "manifest" in stage_cache.path_state(data)
    (tmp_path / "raw.dvc").write_text("outs:\n- md5: abc.dir\n  path: raw\n")
    assert "dvc" in stage_cache.path_state(data)
    assert stage_cache.path_state(tmp_path / "nope") == {"missing": str(tmp_path / "nope")}


# ------------------------------------------------------------- commands parse with facepipe's CLI


def parses(argv: list[str]) -> bool:
    """Whether facepipe's own command line accepts `argv` (argparse exits on an unknown flag)."""
    from facepipe.cli import parse_line

    try:
        return parse_line(argv)[1] is None
    except SystemExit:
        return False


def model_eval_available() -> bool:
    return parses(["evaluate", "--model", "models:/m/1", "--shards", "s", "--out", "o"])


def test_flow_stage_commands_parse(tmp_path):
    from flows.evaluate import benchmark_argv
    from flows.ingest import align_argv, decode_argv, synth_argv
    from flows.train import backbone_argv, head_argv

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    s = FlowSettings(str(tmp_path), "params.yaml", ["decode.validate_images=true", "decode.skip_bad=true"])
    commands = [
        synth_argv(s), decode_argv(s), align_argv(s), backbone_argv(s, "data/shards", "bb"),
        *(head_argv(s, m, "models:/facepipe-backbone/1", "data/shards", m) for m in ("pfe", "scf")),
    ]  # fmt: skip
    for argv in commands:
        assert parses(argv), argv
    if model_eval_available():
        assert parses(benchmark_argv(s, "models:/facepipe-probface/1", "data/shards", "reports/x"))
        # one process per model: the pair tables and both protocol sets, the backbone's outputs cached
        protocols = ["data/raw/protocols/ijb", "data/raw/protocols/video"]
        argv = benchmark_argv(s, "models:/facepipe-pfe/1", "data/shards", "reports/x", protocols)
        assert parses(argv) and argv.count("--protocol") == 2
        assert argv[argv.index("--embedding-cache") + 1] == f"{tmp_path}/data/features/eval-embeddings"


def render_dvc(text: str, params: dict, item=None, key: str | None = None) -> str:
    """DVC's `${...}` interpolation: params, and a foreach's `${item}`, `${item.field}` and `${key}`."""
    import re

    def value(match) -> str:
        name = match.group(1)
        if name == "key":
            return str(key)
        node = {"item": item, **params} if name.split(".")[0] == "item" else params
        for part in name.split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([\w.]+)\}", value, text)


def test_dvc_stage_commands_parse_and_params_exist():
    import shlex

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    config_keys = set(load_config(REPO / "params.yaml").model_dump())
    names = set()
    for name, stage in dvc["stages"].items():
        if "foreach" in stage:  # a list (key = the item) or a mapping of keys to items
            each = stage["foreach"]
            items = list(each.items()) if isinstance(each, dict) else [(i, i) for i in each]
        else:
            items = [(None, None)]
        for key, item in items:
            body = stage["do"] if key is not None else stage
            names.add(f"{name}@{key}" if key is not None else name)
            tokens = shlex.split(render_dvc(body["cmd"], params, item, key))
            assert tokens[0] == "facepipe", body["cmd"]
            if tokens[1] == "evaluate" and "--model" in tokens and not model_eval_available():
                continue
            assert parses(tokens[1:]), tokens
            for key in body.get("params", []):
                assert key.split(".")[0] in config_keys, key
    assert {"sample", "decode", "train-backbone", "train-pfe", "train-probface", "train-scf"} <= names


def test_every_training_stage_has_a_deployment_and_a_dvc_stage():
    from facepipe.uncertainty.registry import method_names

    entrypoints = {dep["entrypoint"] for dep in PREFECT_YAML["deployments"]}
    dvc_stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in [*method_names(), "finetune"]:
        assert f"flows/train.py:train_{stage}" in entrypoints, stage
        assert f"train-{stage}" in dvc_stages, stage
    assert set(method_names()) <= set(dvc_stages["benchmark"]["foreach"])


def test_the_pipeline_pins_the_backbone_it_trained_for_the_later_stages():
    """Heads and fine-tune build on the backbone version this run trained, not on whatever `champion`
    names when they start (the benchmark may move it; a rerun must find every stage up to date)."""
    import inspect

    from flows.train import HEAD_FLOWS, train_finetune

    for flow in [*HEAD_FLOWS.values(), train_finetune]:
        assert "backbone_version" in inspect.signature(flow.fn).parameters, flow.name
