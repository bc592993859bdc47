"""Chart test helpers: render helm/recserve with the real `helm`, read the KubeRay CRDs, walk pod specs.

Shared by the tests/helm modules (one per template family). Nothing here asserts; the tests do.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "recserve"
PROFILES = ("default", "minimal", "production")
RELEASE = "recserve"
NAMESPACE = "recserve"
# The Kubernetes version every object is validated against (kubernetes-validate's newest schemas).
KUBERNETES_VERSION = "1.37.0"
TOOLS_BIN = REPO / ".tools" / "bin"
INSTALL_SCRIPT = REPO / "scripts" / "install-k8s-tools.sh"

Doc = dict[str, Any]


class HelmError(RuntimeError):
    """`helm` refused to render; the message is helm's stderr."""


@functools.cache
def tool(name: str) -> Path | None:
    """Path of helm/kubectl/checkov in .tools/bin, installing them with the project script once."""
    path = TOOLS_BIN / name
    if not path.exists():
        # The project's own installer (idempotent); a failure leaves the tool missing and the caller skips.
        subprocess.run(["bash", str(INSTALL_SCRIPT)], cwd=REPO, capture_output=True, check=False)
    return path if path.exists() else None


def venv_tool(name: str) -> Path | None:
    """A console script of the test interpreter's environment (hadolint, kubernetes-validate)."""
    here = Path(sys.executable).parent / name
    found = here if here.exists() else shutil.which(name)
    return Path(found) if found else None


def helm_args(
    values_files: Sequence[Path] = (),
    set_json: dict[str, Any] | None = None,
    chart: Path = CHART,
) -> list[str]:
    helm = tool("helm")
    assert helm is not None, "helm is not installed (scripts/install-k8s-tools.sh)"
    args = [str(helm), "template", RELEASE, str(chart), "--namespace", NAMESPACE]
    for f in values_files:
        args += ["-f", str(f)]
    for key, value in (set_json or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def render_text(
    values_files: Sequence[Path] = (),
    set_json: dict[str, Any] | None = None,
    chart: Path = CHART,
) -> str:
    """`helm template` output as text; HelmError with helm's message when it refuses."""
    proc = subprocess.run(
        helm_args(values_files, set_json, chart), capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise HelmError(proc.stderr.strip())
    return proc.stdout


def parse_docs(text: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(text) if d]


def render(
    values_files: Sequence[Path] = (),
    set_json: dict[str, Any] | None = None,
    chart: Path = CHART,
) -> list[Doc]:
    """The rendered objects of the chart with these values files and `--set-json` overrides."""
    return parse_docs(render_text(values_files, set_json, chart))


@functools.cache
def render_profile(profile: str) -> tuple[Doc, ...]:
    """A ci/<profile>-values.yaml rendering, cached (tests must not mutate the objects)."""
    return tuple(render([CHART / "ci" / f"{profile}-values.yaml"]))


def profile_values(profile: str) -> dict[str, Any]:
    """values.yaml deep-merged with ci/<profile>-values.yaml (Helm's merge: maps merge, null deletes)."""
    base = yaml.safe_load((CHART / "values.yaml").read_text())
    override = yaml.safe_load((CHART / "ci" / f"{profile}-values.yaml").read_text()) or {}
    return _merge(base, override)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def of_kind(docs: Sequence[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: Sequence[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def serve_config(docs: Sequence[Doc]) -> dict[str, Any]:
    """The RayService's serveConfigV2, parsed."""
    config = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    assert isinstance(config, dict)
    return config


def pod_templates(docs: Sequence[Doc]) -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    """(where, pod spec, pod labels) of every pod the objects create, including the Ray head and
    workers (with the ray.io/node-type label KubeRay adds to them)."""
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet"):
            t = d["spec"]["template"]
            yield f"{kind}/{name}", t["spec"], t["metadata"]["labels"]
        elif kind == "CronJob":
            t = d["spec"]["jobTemplate"]["spec"]["template"]
            yield f"{kind}/{name}", t["spec"], t["metadata"]["labels"]
        elif kind == "RayService":
            cluster = d["spec"]["rayClusterConfig"]
            head = cluster["headGroupSpec"]["template"]
            yield (
                "ray-head",
                head["spec"],
                {**head["metadata"]["labels"], "ray.io/node-type": "head"},
            )
            for group in cluster.get("workerGroupSpecs", []):
                t = group["template"]
                labels = {**t["metadata"]["labels"], "ray.io/node-type": "worker"}
                yield f"ray-worker/{group['groupName']}", t["spec"], labels


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's env entries by name."""
    return {e["name"]: e for e in container.get("env", [])}


# --- KubeRay CRDs --------------------------------------------------------------------------------------


def crd_dir() -> Path | None:
    """../shared/k8s-schemas next to the repo, or $RECSERVE_K8S_SCHEMAS."""
    for candidate in (
        os.environ.get("RECSERVE_K8S_SCHEMAS"),
        REPO.parent / "shared" / "k8s-schemas",
    ):
        if candidate and (Path(candidate) / "ray.io_rayservices.yaml").exists():
            return Path(candidate)
    return None


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected, as the API server does with strict field
    validation (kubectl's default): objects with declared properties get additionalProperties false."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(filename: str, version: str = "v1") -> dict[str, Any]:
    """openAPIV3Schema of one version of a CRD in the schemas dir, made strict."""
    directory = crd_dir()
    assert directory is not None
    # The CRDs are ~1 MB of YAML: libyaml's loader when PyYAML has it, ten times faster.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((directory / filename).read_text(), Loader=loader)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return dict(strict(v["schema"]["openAPIV3Schema"]))
    raise KeyError(f"{filename} has no version {version}")


@functools.cache
def crd_validator(filename: str, *path: str) -> jsonschema.Draft7Validator:
    """A validator of a CRD's strict schema, or of the sub-schema at `path` (property names)."""
    schema: dict[str, Any] = crd_schema(filename)
    for key in path:
        schema = schema["properties"][key]
    return jsonschema.Draft7Validator(schema)


def validate_object(doc: Doc) -> None:
    """Validate one rendered object with the real schema of its kind; raises on any violation.

    Built-in kinds: kubernetes-validate, strict (unknown fields refused), Kubernetes KUBERNETES_VERSION.
    RayService: the KubeRay CRD. Prometheus-operator kinds: the operator's CRD models
    (cloudcoil-models-prometheus-operator), which must read the object back unchanged: a field they
    drop is a field the operator does not know.
    """
    api_group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
    if api_group == "ray.io":
        filename = {
            "RayService": "ray.io_rayservices.yaml",
            "RayCluster": "ray.io_rayclusters.yaml",
        }
        crd_validator(filename[doc["kind"]]).validate(doc)
    elif api_group == "monitoring.coreos.com":
        from cloudcoil.models.prometheus_operator import v1 as prometheus_v1

        model = getattr(prometheus_v1, doc["kind"]).model_validate(doc)
        back = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
        if back != doc:
            raise ValueError(f"{doc['kind']} has fields the CRD does not define: {doc} != {back}")
    else:
        import kubernetes_validate

        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
