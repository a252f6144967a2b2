"""The infra files parse, carry the fields their tools need, and name what the package ships.

Versions are checked against requirements.lock (the one place that names them) and pyproject.toml,
commands against the `[project.scripts]` entry points and facepipe's sub-commands, so a version bump or a
renamed command breaks these tests instead of a cluster deployment. No committed infra file holds a
secret, Ray runs with token auth everywhere and the cluster files use the tests' S3 layout. Schema
validation of every file (and of broken copies) is in test_infra_schemas.py.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

import facepipe
from facepipe.cli import COMMANDS
from tests.s3_server import S3Server
from tools import infra_check
from tools.lockfile import pinned_versions, public_version

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
LOCKED = {name: public_version(v) for name, v in pinned_versions().items()}
RAY_VERSION = LOCKED["ray"]
PY_TAG = "py311"  # the images' Python
BUCKET = "facepipe"  # the one bucket of the cluster files (shards/, runs/, features/, mlflow/, dvc/)


def dependency_spec(name: str) -> SpecifierSet:
    for dep in PYPROJECT["project"]["dependencies"]:
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$", dep)
        if match and match.group(1).lower() == name:
            return SpecifierSet(match.group(3))
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def image_tag(image: str) -> str:
    return image.rsplit(":", 1)[1]


def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def facepipe_image_ok(image: str) -> None:
    """facepipe images are tagged with the package version (optionally -gpu)."""
    assert image.split(":")[0].endswith("facepipe"), image
    assert image_tag(image) in (facepipe.__version__, f"{facepipe.__version__}-gpu"), image


def check_facepipe_command(tokens: list[str]) -> None:
    """A `facepipe SUB ...` command line names an entry point and a known sub-command."""
    assert tokens[0] in SCRIPTS, f"{tokens[0]} is not a [project.scripts] entry point"
    assert tokens[1] in COMMANDS, f"facepipe has no sub-command {tokens[1]!r}"


def test_every_infra_yaml_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert len(files) >= 4
    for path in files:
        assert load_all(path), f"{path} is empty"


def test_pins_match_the_lock():
    """What the images pin is what the lock pins, inside what the package accepts."""
    for name in ("ray", "prefect", "mlflow", "torch"):
        assert LOCKED[name] in dependency_spec(name), name
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains("3.11")


# ------------------------------------------------------------------------------------------ Ray


def test_ray_cluster_yaml_is_valid_for_ray_up():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    for key in (
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "head_start_ray_commands",
    ):
        assert key in raw, key
    validate_config(prepare_config(dict(raw)))  # Ray's own schema, as `ray up` applies it
    assert raw["head_node_type"] in raw["available_node_types"]
    facepipe_image_ok(raw["docker"]["image"])
    for node in raw["available_node_types"].values():
        if "docker" in node:
            facepipe_image_ok(node["docker"]["worker_image"])
    head = " ".join(raw["head_start_ray_commands"])
    assert "ray start --head" in head and "--port=6379" in head
    assert any("$RAY_HEAD_IP:6379" in c for c in raw["worker_start_ray_commands"])
    setup = " ".join(raw["setup_commands"])
    assert f"'{facepipe.__version__}'" in setup and f"'{RAY_VERSION}'" in setup


def test_ray_schema_rejects_a_misspelt_key():
    """The schema check above has teeth: an unknown top-level key fails."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    raw["head_node_typo"] = "head"
    with pytest.raises(Exception, match="head_node_typo|Additional properties"):
        validate_config(prepare_config(raw))


def test_dockerfile_matches_ray_python_and_torch_pins():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M).group(1)
    assert base == f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-cpu"
    assert f"torch=={LOCKED['torch']}" in text
    # everything but torch installs from the lock, hash-checked and without resolving
    assert "COPY --chown=ray:users requirements.lock" in text and "--require-hashes" in text
    assert "pip install --no-cache-dir --no-deps --no-build-isolation -e ." in text
    assert f"facepipe:{facepipe.__version__}" in text  # the documented build tag
    mlflow_df = (INFRA / "docker" / "mlflow.Dockerfile").read_text()
    assert f"ghcr.io/mlflow/mlflow:v{LOCKED['mlflow']}" in mlflow_df


# -------------------------------------------------------------------------------------- KubeRay


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    for c in _containers(head["template"]):
        facepipe_image_ok(c["image"])
    ports = {p["containerPort"] for c in _containers(head["template"]) for p in c.get("ports", [])}
    assert {6379, 8265, 10001} <= ports
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        for c in _containers(group["template"]):
            facepipe_image_ok(c["image"])


def test_kuberay_raycluster_manifest():
    docs = load_all(INFRA / "kubernetes" / "raycluster.yaml")
    clusters = [d for d in docs if d["kind"] == "RayCluster"]
    assert len(clusters) == 1
    cluster = clusters[0]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["name"]
    _check_ray_cluster_spec(cluster["spec"])
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()


def test_kuberay_rayjob_manifest_runs_a_facepipe_command():
    (job,) = load_all(INFRA / "kubernetes" / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    tokens = shlex.split(spec["entrypoint"])
    check_facepipe_command(tokens)
    # the command line parses with facepipe's own parser, and its overrides name real configuration keys
    from facepipe.cli import build_parser
    from facepipe.config import load_config

    args = build_parser().parse_args(tokens[1:])
    assert args.overrides and args.address == "auto"
    load_config(REPO / "params.yaml", args.overrides)


def test_cluster_service_names_agree():
    """The Ray client address in prefect.yaml is the head service KubeRay creates for the RayCluster."""
    (cluster,) = [d for d in load_all(INFRA / "kubernetes" / "raycluster.yaml") if d["kind"] == "RayCluster"]
    prefect_yaml = (REPO / "prefect.yaml").read_text()
    assert f"ray://{cluster['metadata']['name']}-head-svc." in prefect_yaml


# -------------------------------------------------------------------------------------- compose


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())


def _env_example() -> dict[str, str]:
    out = {}
    for line in (INFRA / "compose" / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_compose_has_the_services():
    services = _compose()["services"]
    for name in (
        "prefect-server",
        "prefect-db",
        "prefect-worker",
        "mlflow",
        "mlflow-db",
        "minio",
        "ray-head",
    ):
        assert name in services, name
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
    assert image_tag(services["prefect-server"]["image"]).startswith(LOCKED["prefect"] + "-python3.11")
    assert services["prefect-server"]["command"][:3] == ["prefect", "server", "start"]
    db_url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://") and "@prefect-db:5432/" in db_url
    facepipe_image_ok(services["prefect-worker"]["image"])
    assert services["prefect-worker"]["build"]["dockerfile"] == "infra/docker/Dockerfile"
    assert (REPO / "infra" / "docker" / "Dockerfile").is_file()


def test_compose_worker_serves_the_prefect_yaml_pool():
    services = _compose()["services"]
    cmd = services["prefect-worker"]["command"]
    assert cmd[:3] == ["prefect", "worker", "start"]
    pool = cmd[cmd.index("--pool") + 1]
    pools = {
        d["work_pool"]["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    }
    assert pool in pools


def test_compose_mlflow_uses_basic_auth_postgres_and_minio():
    services = _compose()["services"]
    mlflow = services["mlflow"]
    script = "\n".join(mlflow["command"])
    assert "mlflow server" in script and "--app-name basic-auth" in script
    env = mlflow["environment"]
    assert (
        env["MLFLOW_BACKEND_URI"].startswith("postgresql://")
        and "@mlflow-db:5432/" in env["MLFLOW_BACKEND_URI"]
    )
    assert f"s3://{BUCKET}/mlflow" in script and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert f"mc mb --ignore-existing local/{BUCKET}" in "\n".join(services["minio-init"]["command"])


def test_compose_settings_come_from_env_without_secrets():
    text = (INFRA / "compose" / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    example = _env_example()
    assert used <= example.keys(), f"variables missing from .env.example: {used - example.keys()}"
    for key, value in example.items():
        if any(word in key for word in ("PASSWORD", "SECRET")):
            assert value == "CHANGE-ME", f"{key} must not hold a real secret in .env.example"
    # every password/secret a service gets is a ${VAR} from .env, never a literal
    compose = _compose()
    envs = [svc.get("environment", {}) for svc in compose["services"].values()]
    envs += [v for k, v in compose.items() if k.startswith("x-")]
    checked = 0
    for env in envs:
        for key, value in env.items():
            if any(word in key for word in ("PASSWORD", "SECRET")):
                assert str(value).startswith("${"), f"{key} holds a literal value"
                checked += 1
    assert checked >= 6


def test_readme_covers_scheduled_retraining():
    text = (INFRA / "README.md").read_text()
    assert "Scheduled retraining" in text
    assert "train-probface/kubernetes" in text
    for rel in (
        "ray/cluster.yaml",
        "kubernetes/raycluster.yaml",
        "kubernetes/rayjob.yaml",
        "kubernetes/storage.yaml",
        "kubernetes/prefect-base-job-template.json",
        "compose/docker-compose.yml",
        "tools/infra_check.py",
    ):
        assert rel in text, rel
    assert "untestable" in text.lower()


# ------------------------------------------------------------------------- security and storage


def _job_template() -> dict:
    return json.loads(infra_check.JOB_TEMPLATE.read_text())


def _token_env_ok(env: list[dict]) -> bool:
    by_name = {e["name"]: e for e in env}
    return (
        by_name["RAY_AUTH_MODE"].get("value") == "token"
        and "secretKeyRef" in by_name["RAY_AUTH_TOKEN"]["valueFrom"]
    )


def test_ray_runs_with_token_auth_in_every_cluster_file():
    for name in ("raycluster.yaml", "rayjob.yaml"):
        for doc in load_all(INFRA / "kubernetes" / name):
            if doc["kind"] not in ("RayCluster", "RayJob"):
                continue
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            templates = [
                spec["headGroupSpec"]["template"],
                *(g["template"] for g in spec["workerGroupSpecs"]),
            ]
            templates += (
                [doc["spec"]["submitterPodTemplate"]] if "submitterPodTemplate" in doc["spec"] else []
            )
            for c in (c for t in templates for c in _containers(t)):
                assert _token_env_ok(c.get("env", [])), f"{name}: {c['name']} runs without token auth"
    pod = infra_check.render_job_template(_job_template())["spec"]["template"]["spec"]
    assert _token_env_ok(pod["containers"][0]["env"])  # the flow run's ray:// client
    for name, svc in _compose()["services"].items():
        if svc.get("image", "").startswith("facepipe:"):
            env = svc["environment"]
            assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${"), name
    raw = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    starts = [
        c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c
    ]
    assert starts and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]
    assert "~/.ray/auth_token" in raw["file_mounts"]  # the token itself comes from the user's machine


def test_cluster_files_use_the_tests_s3_layout():
    """Same bucket layout and endpoint variables as tests/s3_server.py: shards/, runs/ in one bucket."""
    test_vars = set(S3Server("http://127.0.0.1:1", None).env())  # AWS_* names the tests set
    env = _compose()["services"]["prefect-worker"]["environment"]
    assert test_vars <= env.keys() and test_vars <= _compose()["services"]["ray-head"]["environment"].keys()
    (settings,) = [d for d in load_all(INFRA / "kubernetes" / "raycluster.yaml") if d["kind"] == "ConfigMap"]
    assert "AWS_ENDPOINT_URL" in settings["data"]
    (job,) = load_all(INFRA / "kubernetes" / "rayjob.yaml")
    assert f"--shards s3://{BUCKET}/shards" in job["spec"]["entrypoint"]
    assert f"paths.runs=s3://{BUCKET}/runs" in job["spec"]["entrypoint"]
    overrides = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]["parameters"]["cluster"][
        "overrides"
    ]
    assert f"paths.runs=s3://{BUCKET}/runs" in overrides and f"paths.shards=s3://{BUCKET}/shards" in overrides
    assert f"paths.runs=s3://{BUCKET}/runs" in (INFRA / "ray" / "cluster.yaml").read_text()


def test_no_secret_in_committed_infra_files():
    files = [*infra_check.infra_files(), REPO / "prefect.yaml"]
    assert any(p.name == ".env.example" for p in files)
    assert [line for p in files for line in infra_check.secret_problems(p)] == []


def test_secret_scan_finds_planted_secrets(tmp_path):
    planted = copy.deepcopy(_compose())
    planted["services"]["minio"]["environment"]["MINIO_ROOT_PASSWORD"] = "hunter2hunter2"
    planted["x-ray"] = {"env": [{"name": "RAY_AUTH_TOKEN", "value": "3f9a0c1d2e"}]}
    planted["x-db"] = "postgresql://mlflow:s3cret@mlflow-db:5432/mlflow"
    (tmp_path / "compose.yml").write_text(yaml.safe_dump(planted))
    problems = "\n".join(infra_check.secret_problems(tmp_path / "compose.yml"))
    assert "MINIO_ROOT_PASSWORD" in problems and "RAY_AUTH_TOKEN" in problems
    assert "a password inside a URL" in problems
    env = tmp_path / ".env.example"
    env.write_text(
        "RAY_AUTH_TOKEN=CHANGE-ME\nAWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG\nKEY_ID=AKIAIOSFODNN7EXAMPLE\n"
    )
    problems = "\n".join(infra_check.secret_problems(env))
    assert "line 2: AWS_SECRET_ACCESS_KEY" in problems and "AWS access key id" in problems
    assert "line 1" not in problems  # the placeholder is fine
