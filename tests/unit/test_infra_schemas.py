"""Every cluster file validates offline, and a deliberately broken copy of each fails.

Kubernetes manifests against the Kubernetes OpenAPI schemas bundled with kubernetes-validate (KubeRay
resources: their CRD fields against infra/kubernetes/kuberay-v1.schema.json, their pod templates as core
PodTemplateSpec), the Prefect base job template rendered and validated as a batch/v1 Job, compose against
the vendored compose-spec schema; all through tools/infra_check.py, with network access refused.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from tools import infra_check

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())


@pytest.fixture
def no_network(monkeypatch):
    """Validation must work offline: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _docs_with(name: str, tmp_path: Path, edit) -> Path:
    """A copy of a manifest with one deliberate mistake, written where the checker can read it."""
    docs = load_all(INFRA / "kubernetes" / name)
    edit(docs)
    out = tmp_path / name
    out.write_text(yaml.safe_dump_all(docs))
    return out


K8S_FILES = sorted(p.name for p in (INFRA / "kubernetes").glob("*.yaml"))


@pytest.mark.parametrize("name", K8S_FILES)
def test_kubernetes_manifest_validates_offline(name, no_network):
    assert infra_check.manifest_problems(INFRA / "kubernetes" / name) == []


def _head(docs):
    return docs[0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


BROKEN = {  # file, mistake, a word the error must name
    "pvc-wrong-type": ("storage.yaml", lambda d: d[0]["spec"].update(accessModes="ReadWriteMany"), "array"),
    "configmap-misspelt": ("raycluster.yaml", lambda d: d[1].update(datta=d[1].pop("data")), "datta"),
    "pod-template-misspelt": (
        "raycluster.yaml",
        lambda d: _head(d).update(imagePullPolicyy="Always"),
        "imagePullPolicyy",
    ),
    "pod-template-wrong-type": (
        "raycluster.yaml",
        lambda d: _head(d)["ports"][0].update(containerPort="6379"),
        "integer",
    ),
    "crd-wrong-type": (
        "raycluster.yaml",
        lambda d: d[0]["spec"]["workerGroupSpecs"][0].update(replicas="0"),
        "integer",
    ),
    "crd-misspelt": (
        "rayjob.yaml",
        lambda d: d[0]["spec"].update(shutdownAfterJobFinish=True),
        "shutdownAfterJobFinish",
    ),
    "submitter-misspelt": (
        "rayjob.yaml",
        lambda d: d[0]["spec"]["submitterPodTemplate"]["spec"]["containers"][0].update(enviroment=[]),
        "enviroment",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_kubernetes_validation_rejects_a_broken_copy(case, tmp_path):
    name, edit, word = BROKEN[case]
    problems = infra_check.manifest_problems(_docs_with(name, tmp_path, edit))
    assert problems and all(str(tmp_path / name) in line for line in problems), problems
    assert any(word in line for line in problems), problems


def _job_template() -> dict:
    return json.loads(infra_check.JOB_TEMPLATE.read_text())


def test_prefect_job_template_and_job_variables_validate(no_network):
    assert infra_check.job_template_problems() == []
    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    job_vars = raw["definitions"]["work_pools"]["kubernetes"]["job_variables"]
    pod = infra_check.render_job_template(_job_template(), job_vars)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert claims["data"] == job_vars["data_claim_name"] and mounts["data"] == job_vars["data_mount_path"]
    assert container["image"] == job_vars["image"]
    env = {e["name"] for e in container["env"]}
    assert set(job_vars["env"]) | {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env
    # the flow's working directory (params.yaml, stage markers) lies on the mounted claim
    workdir = raw["definitions"]["parameters"]["cluster"]["workdir"]
    assert Path(workdir).is_relative_to(mounts["data"]), workdir


def test_prefect_job_template_rejects_broken_copies(tmp_path):
    template = _job_template()
    template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["volumes"][0][
        "persistentVolumeClaimm"
    ] = {}
    bad_template = tmp_path / "template.json"
    bad_template.write_text(json.dumps(template))
    assert any("persistentVolumeClaimm" in p for p in infra_check.job_template_problems(bad_template))
    prefect_yaml = (REPO / "prefect.yaml").read_text().replace("data_claim_name:", "data_claim_nmae:", 1)
    bad_yaml = tmp_path / "prefect.yaml"
    bad_yaml.write_text(prefect_yaml)
    problems = infra_check.job_template_problems(prefect_yaml=bad_yaml)
    assert any("'data_claim_nmae' is not a variable" in p for p in problems), problems


def _claims(node) -> set[str]:
    if isinstance(node, dict):
        found = {node["claimName"]} if "claimName" in node else set()
        return found.union(*(_claims(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_claims(v) for v in node))
    return set()


def test_every_mounted_claim_is_defined():
    defined = {
        d["metadata"]["name"]
        for name in K8S_FILES
        for d in load_all(INFRA / "kubernetes" / name)
        if d["kind"] == "PersistentVolumeClaim"
    }
    mounted = _claims(infra_check.render_job_template(_job_template()))
    for name in K8S_FILES:
        mounted |= _claims(load_all(INFRA / "kubernetes" / name))
    assert mounted and mounted <= defined, f"claims mounted but defined nowhere: {mounted - defined}"


def test_compose_validates_against_the_compose_spec(no_network, tmp_path):
    compose = INFRA / "compose" / "docker-compose.yml"
    assert infra_check.compose_problems(compose) == []
    broken = _compose()
    broken["services"]["minio"]["enviroment"] = broken["services"]["minio"].pop("environment")
    broken["services"]["mlflow"]["ports"] = "5000:5000"  # a list in the spec
    (tmp_path / "compose.yml").write_text(yaml.safe_dump(broken))
    problems = infra_check.compose_problems(tmp_path / "compose.yml")
    assert any("enviroment" in p for p in problems) and any("services/mlflow/ports" in p for p in problems)


def test_a_file_that_does_not_parse_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: not valid YAML") as info:
        infra_check.manifest_problems(bad)
    assert "\n" not in str(info.value)
