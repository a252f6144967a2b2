"""Validate facepipe's cluster files offline and scan them for committed secrets.

    python tools/infra_check.py        # exit 1 and one line per problem, each naming its file

- Kubernetes manifests: the OpenAPI schemas bundled with `kubernetes-validate` (no network), strict, so
  an unknown field is an error. KubeRay custom resources (ray.io/v1) have no bundled schema: their CRD
  fields are checked against infra/kubernetes/kuberay-v1.schema.json and every embedded pod template
  (head, worker groups, RayJob submitter) as a core PodTemplateSpec.
- The Prefect Kubernetes base job template: rendered with its variables' defaults by Prefect's own
  templating, then its job_manifest validated as a batch/v1 Job; prefect.yaml's kubernetes job_variables
  must be variables the template declares (Prefect ignores unknown ones silently).
- Compose: the compose-spec JSON schema vendored at infra/compose/compose-spec.json.
- Secrets: a literal value under a password/secret/token/key name, AWS access key ids, private keys and
  credentials inside URLs; `${VAR}` references and the `CHANGE-ME` placeholder are allowed.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S_VERSION = "1.33"  # the oldest Kubernetes release the manifests promise to work on
KUBERAY_SCHEMA = INFRA / "kubernetes" / "kuberay-v1.schema.json"
COMPOSE_SCHEMA = INFRA / "compose" / "compose-spec.json"
JOB_TEMPLATE = INFRA / "kubernetes" / "prefect-base-job-template.json"
PLACEHOLDERS = {"", "CHANGE-ME"}
SECRET_NAME = re.compile(r"pass(word|wd)?|secret|token|api_?key|access_?key|private_?key", re.I)
SECRET_TEXT = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"[a-z0-9+.-]+://[^\s/:@'\"]+:(?!\$)[^\s@/'\"]+@"), "a password inside a URL"),
]


def _where(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _json_path(parts) -> str:
    return "/".join(str(p) for p in parts) or "<root>"


def load_docs(path: Path) -> list[Any]:
    """The YAML (or JSON) documents in a file; a parse error is raised as one line naming the file."""
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise ValueError(f"{_where(path)}: not valid YAML: {exc}".replace("\n", " ")) from None


def k8s_errors(doc: dict, where: str) -> list[str]:
    """A core/apps/batch resource against the bundled Kubernetes schema (first error only)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {_json_path(exc.path)}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{where}: {exc.message}"]
    return []


def pod_template_errors(template: Any, where: str) -> list[str]:
    """An embedded pod template, as the `template` of a core v1 PodTemplate (a PodTemplateSpec)."""
    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    return [e.replace(": template/", ": ", 1) for e in k8s_errors(wrapper, where)]


def kuberay_errors(doc: dict, where: str) -> list[str]:
    defs = json.loads(KUBERAY_SCHEMA.read_text())["definitions"]
    kind = doc.get("kind")
    if kind not in defs:
        return [f"{where}: kind {kind!r} is not in {_where(KUBERAY_SCHEMA)}"]
    validator = jsonschema.Draft7Validator({"$ref": f"#/definitions/{kind}", "definitions": defs})
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    problems = [f"{where}: {_json_path(e.absolute_path)}: {e.message}" for e in errors]
    if problems:
        return problems  # the pod templates' places are only known once the CRD fields are right
    spec = doc["spec"]
    templates = {}
    if kind == "RayJob":
        if "submitterPodTemplate" in spec:
            templates["spec/submitterPodTemplate"] = spec["submitterPodTemplate"]
        spec, prefix = spec["rayClusterSpec"], "spec/rayClusterSpec"
    else:
        prefix = "spec"
    templates[f"{prefix}/headGroupSpec/template"] = spec["headGroupSpec"]["template"]
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        templates[f"{prefix}/workerGroupSpecs/{i}/template"] = group["template"]
    for place, template in templates.items():
        problems += pod_template_errors(template, f"{where}: {place}")
    return problems


def manifest_problems(path: Path) -> list[str]:
    """Every document of a Kubernetes manifest file."""
    problems = []
    for i, doc in enumerate(load_docs(path)):
        where = f"{_where(path)} (document {i + 1}, {doc.get('kind', '?')})"
        if str(doc.get("apiVersion", "")).startswith("ray.io/"):
            problems += kuberay_errors(doc, where)
        else:
            problems += k8s_errors(doc, where)
    return problems


def render_job_template(template: dict, values: dict[str, Any] | None = None) -> dict:
    """The Job a Prefect Kubernetes worker would submit: the variables' defaults, then `values` (a
    deployment's job_variables), rendered by Prefect's templating; then what prefect-kubernetes does
    before submitting: the `env` dict goes before the template's own env list, a string command is split."""
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    filled = {k: v["default"] for k, v in props.items() if "default" in v}
    filled |= {"name": "facepipe-flow-run", "command": "prefect flow-run execute", "labels": {}, "env": {}}
    filled |= values or {}
    manifest = apply_values(template["job_configuration"]["job_manifest"], filled)
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    if isinstance(container.get("args"), str):
        container["args"] = shlex.split(container["args"])
    env = [{"name": k, "value": str(v)} for k, v in filled["env"].items()]
    container["env"] = [*env, *(container.get("env") or [])]
    return manifest


def job_template_problems(path: Path = JOB_TEMPLATE, prefect_yaml: Path = REPO / "prefect.yaml") -> list[str]:
    """The base job template, and prefect.yaml's kubernetes job_variables rendered through it."""
    where, yaml_where = _where(path), _where(prefect_yaml)
    try:
        template = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{where}: not valid JSON: {exc}"]
    variables = template["variables"]
    meta = jsonschema.Draft7Validator(jsonschema.Draft7Validator.META_SCHEMA)
    problems = [f"{where}: variables: {e.message}" for e in meta.iter_errors(variables)]
    declared = set(variables.get("properties", {}))
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    problems += [
        f"{where}: placeholder {{{{ {n} }}}} is not a declared variable" for n in sorted(used - declared)
    ]
    pools = load_docs(prefect_yaml)[0].get("definitions", {}).get("work_pools", {})
    job_vars = pools.get("kubernetes", {}).get("job_variables", {})
    problems += [
        f"{yaml_where}: kubernetes job_variables: {e.message}"
        for e in jsonschema.Draft7Validator(variables).iter_errors(job_vars)
    ]
    problems += [
        f"{yaml_where}: kubernetes job_variables: {k!r} is not a variable of {where}"
        for k in sorted(set(job_vars) - declared)
    ]
    if not problems:  # what a flow run of the kubernetes deployments would submit
        problems += k8s_errors(render_job_template(template, job_vars), f"{where}: job_manifest")
    return problems


def compose_problems(path: Path, schema: Path = COMPOSE_SCHEMA) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(schema.read_text()))
    docs = load_docs(path)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        return [f"{_where(path)}: expected one YAML mapping"]
    errors = sorted(validator.iter_errors(docs[0]), key=lambda e: list(e.absolute_path))
    return [f"{_where(path)}: {_json_path(e.absolute_path)}: {e.message}" for e in errors]


def _literal_secret(name: str, value: Any) -> bool:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or not SECRET_NAME.search(name):
        return False
    text = str(value).strip()
    # references (${VAR}, Prefect {{ var }}) and paths to a token file are not secrets themselves
    return text not in PLACEHOLDERS and not text.startswith(("${", "{{", "~/", "/"))


def _walk(node: Any, trail: str, out: list[str]) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("name"), str) and _literal_secret(node["name"], node.get("value")):
            out.append(f"{trail}: {node['name']} holds a literal value")  # a Kubernetes env entry
        for key, value in node.items():
            if _literal_secret(str(key), value):
                out.append(f"{trail}/{key}: holds a literal value")
            _walk(value, f"{trail}/{key}", out)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _walk(item, f"{trail}/{i}", out)


def secret_problems(path: Path) -> list[str]:
    """Secret-looking values in one committed file (YAML/JSON structurally, .env line by line)."""
    where, text = _where(path), path.read_text(errors="replace")
    problems = [f"{where}: contains {what}" for pattern, what in SECRET_TEXT if pattern.search(text)]
    found: list[str] = []
    if path.name.startswith(".env"):
        for n, line in enumerate(text.splitlines(), 1):
            key, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#") and _literal_secret(key.strip(), value):
                found.append(f"line {n}: {key.strip()} holds a literal value")
    elif path.suffix in (".yaml", ".yml", ".json"):
        for i, doc in enumerate(load_docs(path)):
            _walk(doc, f"document {i + 1}", found)
    return problems + [f"{where}: {f} (use a ${{VAR}} reference or a Secret)" for f in found]


def infra_files() -> list[Path]:
    """The files under infra/ that are meant to be committed (a local `.env` holds real secrets and is
    git-ignored, so it is not scanned)."""
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and p.name != ".env" and p.suffix != ".pyc")


def all_problems() -> list[str]:
    problems = []
    for path in sorted((INFRA / "kubernetes").glob("*.yaml")):
        problems += manifest_problems(path)
    problems += job_template_problems()
    problems += compose_problems(INFRA / "compose" / "docker-compose.yml")
    for path in [*infra_files(), REPO / "prefect.yaml"]:
        problems += secret_problems(path)
    return problems


def main() -> int:
    try:
        problems = all_problems()
    except ValueError as exc:
        problems = [str(exc)]
    for line in problems:
        print(line, file=sys.stderr)
    print(f"infra check: {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
