"""The chart as a whole: lint, the three profiles, every object against its real schema, labels,
namespaces, NOTES.txt and the README's values table."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.helm import chart, values_doc

# What each profile installs, written out by hand: a template that silently stops rendering (or starts
# rendering where it should not) fails here.
EXPECTED_OBJECTS = {
    "default": {
        ("ServiceAccount", "recserve"),
        ("RayService", "recserve"),
        ("Service", "recserve-internal"),
        # Credentials generated at install and kept: API keys, Redis ACL passwords, MLflow admin.
        ("Secret", "recserve-api-keys"),
        ("Secret", "recserve-redis-auth"),
        ("Secret", "recserve-mlflow-auth"),
        ("StatefulSet", "recserve-redis"),
        ("Service", "recserve-redis"),
        ("Service", "recserve-redis-headless"),
        ("Deployment", "recserve-mlflow"),
        ("Service", "recserve-mlflow"),
        ("ConfigMap", "recserve-mlflow-auth"),
        ("PersistentVolumeClaim", "recserve-mlflow-auth"),
        ("PersistentVolumeClaim", "recserve-mlflow-artifacts"),
        ("PersistentVolumeClaim", "recserve-data"),
        ("CronJob", "recserve-training"),
        ("CronJob", "recserve-materialization"),
        ("NetworkPolicy", "recserve-default-deny"),
        ("NetworkPolicy", "recserve-dns"),
        ("NetworkPolicy", "recserve-serve"),
        ("NetworkPolicy", "recserve-ray-head"),
        ("NetworkPolicy", "recserve-redis"),
        ("NetworkPolicy", "recserve-mlflow"),
        ("NetworkPolicy", "recserve-jobs"),
        ("PodDisruptionBudget", "recserve-ray-worker"),
    },
    "minimal": {
        ("ServiceAccount", "recserve"),
        ("RayService", "recserve"),
        ("Service", "recserve-internal"),
        ("Secret", "recserve-api-keys"),
        # The minimal profile keeps Redis locked.
        ("Secret", "recserve-redis-auth"),
        ("StatefulSet", "recserve-redis"),
        ("Service", "recserve-redis"),
        ("Service", "recserve-redis-headless"),
    },
    "production": {
        ("ServiceAccount", "recserve"),
        ("RayService", "recserve"),
        ("Service", "recserve-internal"),
        ("Deployment", "recserve-mlflow"),
        ("Service", "recserve-mlflow"),
        ("PersistentVolumeClaim", "recserve-data"),
        ("PersistentVolumeClaim", "recserve-event-spool"),
        ("CronJob", "recserve-training"),
        ("CronJob", "recserve-materialization"),
        ("Ingress", "recserve"),
        ("NetworkPolicy", "recserve-default-deny"),
        ("NetworkPolicy", "recserve-dns"),
        ("NetworkPolicy", "recserve-serve"),
        ("NetworkPolicy", "recserve-ray-head"),
        ("NetworkPolicy", "recserve-mlflow"),
        ("NetworkPolicy", "recserve-jobs"),
        ("PodDisruptionBudget", "recserve-ray-worker"),
        ("PodMonitor", "recserve-ray-workers"),
        ("Service", "recserve-ray-head-metrics"),
        ("ServiceMonitor", "recserve-ray-head"),
        ("PrometheusRule", "recserve"),
    },
}


def monitoring_objects() -> set[tuple[str, str]]:
    """Objects that exist only once monitoring/ has files synced into the chart."""
    files = chart.CHART / "files"
    found = set()
    if list((files / "grafana").glob("*.json")):
        found.add(("ConfigMap", "recserve-grafana-dashboards"))
    return found


@pytest.mark.parametrize("profile", chart.PROFILES)
def test_helm_lint_strict_passes(helm: Path, profile: str) -> None:
    values = chart.CHART / "ci" / f"{profile}-values.yaml"
    proc = subprocess.run(
        [str(helm), "lint", "--strict", str(chart.CHART), "-f", str(values)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


def test_helm_lint_strict_fails_on_a_values_error(helm: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("serve:\n  port: eighty\n")
    proc = subprocess.run(
        [str(helm), "lint", "--strict", str(chart.CHART), "-f", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "/serve/port" in proc.stdout + proc.stderr


@pytest.mark.parametrize("profile", chart.PROFILES)
def test_profile_renders_exactly_the_expected_objects(helm: Path, profile: str) -> None:
    docs = chart.render_profile(profile)
    rendered = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(rendered) == len(set(rendered)), "an object is rendered twice"
    expected = EXPECTED_OBJECTS[profile]
    if profile != "minimal":  # minimal turns the dashboards off
        expected = expected | monitoring_objects()
    assert set(rendered) == expected


@pytest.mark.parametrize("profile", chart.PROFILES)
def test_every_object_validates_against_its_schema(helm: Path, crds: Path, profile: str) -> None:
    for doc in chart.render_profile(profile):
        chart.validate_object(doc)


def test_validation_refuses_broken_objects(helm: Path, crds: Path) -> None:
    docs = chart.render_profile("production")
    deployment = copy.deepcopy(chart.one(docs, "Deployment"))
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        chart.validate_object(deployment)
    deployment = copy.deepcopy(chart.one(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="securityContex"):
        chart.validate_object(deployment)
    monitor = copy.deepcopy(chart.one(docs, "PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["portName"] = "metrics"
    with pytest.raises(ValueError, match="fields the CRD does not define"):
        chart.validate_object(monitor)


@pytest.mark.parametrize("profile", chart.PROFILES)
def test_every_object_is_labelled_and_in_the_release_namespace(helm: Path, profile: str) -> None:
    for doc in chart.render_profile(profile):
        meta = doc["metadata"]
        assert meta["namespace"] == chart.NAMESPACE, meta["name"]
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "recserve"
        assert labels["app.kubernetes.io/instance"] == chart.RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "recserve-0.1.0"
        assert labels["app.kubernetes.io/component"]


def test_chart_app_version_is_the_project_version() -> None:
    project = tomllib.loads((chart.REPO / "pyproject.toml").read_text())["project"]
    chart_yaml = yaml.safe_load((chart.CHART / "Chart.yaml").read_text())
    assert chart_yaml["appVersion"] == project["version"]
    assert chart_yaml["apiVersion"] == "v2"


def test_notes_say_how_to_reach_the_service_and_the_dashboards(helm: Path) -> None:
    def notes(*extra: str) -> str:
        proc = subprocess.run(
            [
                str(helm),
                "install",
                "--dry-run=client",
                chart.RELEASE,
                str(chart.CHART),
                "--namespace",
                chart.NAMESPACE,
                *extra,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return proc.stdout.split("NOTES:", 1)[1]

    text = notes()
    assert "kubectl get crd rayservices.ray.io" in text
    assert "port-forward svc/recserve-internal 8000:8000" in text
    assert "port-forward svc/recserve-head-svc 8265:8265" in text
    assert "create secret generic recserve-mlflow" in text
    # The generated API keys: where they are and how to send them.
    assert (
        "kubectl -n recserve get secret recserve-api-keys -o jsonpath='{.data.client-key}' | base64 -d"
        in text
    )
    assert "Authorization: Bearer $RECSERVE_KEY" in text
    assert "get secret recserve-mlflow-auth -o jsonpath='{.data.password}'" in text
    assert "Grafana dashboards:" in text
    text = notes("-f", str(chart.CHART / "ci" / "production-values.yaml"))
    assert "https://recs.example.com/v1/recommendations" in text
    assert "Public (exactly /v1/recommendations and /v1/events)" in text
    assert "hashed in Secret recserve-api-keys (keys.json); edit it" in text  # nothing to read back
    assert "create secret generic recserve-redis " in text
    assert "PodMonitor: true, ServiceMonitor: true" in text


def test_every_values_key_is_documented() -> None:
    text = (chart.CHART / "values.yaml").read_text()
    documented = {d.path for d in values_doc.documented_values(text)}

    def leaves(node: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
        if isinstance(node, dict) and node:
            return [leaf for k, v in node.items() for leaf in leaves(v, (*prefix, k))]
        return [prefix]

    undocumented = [
        ".".join(leaf)
        for leaf in leaves(yaml.safe_load(text))
        if not any(".".join(leaf[:i]) in documented for i in range(1, len(leaf) + 1))
    ]
    assert undocumented == []


def test_values_table_parser_reads_helm_docs_comments() -> None:
    text = "a:\n  # -- first line\n  # second line\n  b: 1\n  c: 2\n# -- list\nd:\n  - x: 1\n"
    docs = values_doc.documented_values(text)
    assert [(d.path, d.default, d.description) for d in docs] == [
        ("a.b", 1, "first line second line"),
        ("d", [{"x": 1}], "list"),
    ]


def test_readme_values_table_is_current() -> None:
    readme = (chart.CHART / "README.md").read_text()
    table = values_doc.values_table((chart.CHART / "values.yaml").read_text())
    assert values_doc.readme_with_table(readme, table) == readme, (
        "helm/recserve/README.md is stale: run python -m tests.helm.values_doc"
    )


def test_install_guide_names_objects_the_chart_creates_or_reads(helm: Path) -> None:
    guide = (chart.REPO / "docs" / "install.md").read_text()
    docs = [*chart.render_profile("default"), *chart.render_profile("production")]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for service in re.findall(r"svc/([a-z0-9-]+)", guide):
        assert ("Service", service) in names or service == "recserve-serve", service
    for cronjob in re.findall(r"cronjob/([a-z0-9-]+)", guide):
        assert ("CronJob", cronjob) in names, cronjob
    referenced = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for _, spec, _ in chart.pod_templates(chart.render_profile("default"))
        for c in spec["containers"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    for secret in re.findall(r"create secret generic ([a-z0-9-]+)", guide):
        assert secret in referenced, secret
    for link in re.findall(r"\]\((\.\./[^)]+)\)", guide):
        assert (chart.REPO / "docs" / link).resolve().exists(), link


YAMLLINT_CONFIG = (
    "{extends: default, rules: {line-length: {max: 120}, document-start: disable,"
    " comments: {min-spaces-from-content: 1}, braces: {max-spaces-inside: 1}}}"
)


def test_hand_written_yaml_passes_yamllint() -> None:
    yamllint = chart.venv_tool("yamllint")
    assert yamllint is not None, "yamllint is a dev dependency"
    files = [
        chart.CHART / "Chart.yaml",
        chart.CHART / "values.yaml",
        chart.CHART / ".checkov.yaml",
        *sorted((chart.CHART / "ci").glob("*.yaml")),
        *sorted((chart.REPO / "k8s").rglob("kustomization.yaml")),
        chart.REPO / "k8s" / "base" / "values.yaml",
    ]
    proc = subprocess.run(
        [str(yamllint), "-f", "parsable", "-d", YAMLLINT_CONFIG, *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_generated_api_keys_hash_to_the_keys_file_the_pods_mount(helm: Path) -> None:
    docs = chart.render_profile("default")
    secret = chart.one(docs, "Secret", "recserve-api-keys")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    client, operator = data["client-key"], data["operator-key"]
    assert re.fullmatch(r"[A-Za-z0-9]{43}", client) and re.fullmatch(r"[A-Za-z0-9]{43}", operator)
    assert client != operator
    assert json.loads(data["keys.json"]) == {
        "keys": [
            {
                "name": "client",
                "sha256": hashlib.sha256(client.encode()).hexdigest(),
                "scopes": ["recommend", "events"],
            },
            {
                "name": "operator",
                "sha256": hashlib.sha256(operator.encode()).hexdigest(),
                "scopes": ["recommend", "events", "admin", "debug"],
            },
        ]
    }


@pytest.mark.parametrize("existing", ["", "ops-keys"])
def test_ray_containers_mount_the_keys_file_and_turn_auth_on(helm: Path, existing: str) -> None:
    docs = chart.render(set_json={"auth.existingSecret": existing, "auth.secretKey": "k.json"})
    name = existing or "recserve-api-keys"
    generated = [
        s for s in chart.of_kind(docs, "Secret") if s["metadata"]["name"] == "recserve-api-keys"
    ]
    assert len(generated) == (0 if existing else 1)
    ray = [(w, s) for w, s, _ in chart.pod_templates(docs) if w.startswith("ray-")]
    assert {w for w, _ in ray} == {"ray-head", "ray-worker/cpu"}
    for where, spec in ray:
        (volume,) = [v for v in spec["volumes"] if v["name"] == "api-keys"]
        # No subPath anywhere: the kubelet updates the file when the Secret changes (rotation).
        assert volume["secret"] == {
            "secretName": name,
            "defaultMode": 0o440,
            "items": [{"key": "k.json", "path": "keys.json"}],
        }, where
        container = spec["containers"][0]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "api-keys"]
        assert mount == {
            "name": "api-keys",
            "mountPath": "/etc/recserve/api-keys",
            "readOnly": True,
        }
        env = chart.container_env(container)
        values = {k: e.get("value") for k, e in env.items()}
        assert values["RECSERVE_API__AUTH__ENABLED"] == "true"
        assert values["RECSERVE_API__AUTH__KEYS_FILE"] == "/etc/recserve/api-keys/keys.json"
        assert values["RECSERVE_API__RATE_LIMIT__REQUESTS_PER_SECOND"] == "100"
        assert values["RECSERVE_API__RATE_LIMIT__BURST"] == "200"
        # Demo and explain are off in a cluster.
        assert values["RECSERVE_API__EXPLAIN_ENABLED"] == "false"
        assert values["RECSERVE_DEMO__ENABLED"] == "false"
    for where, spec, _ in chart.pod_templates(docs):
        for container in spec["containers"]:
            assert not [m for m in container.get("volumeMounts", []) if "subPath" in m], where


def test_auth_off_mounts_no_keys(helm: Path) -> None:
    docs = chart.render(
        set_json={"auth.enabled": False, "demo.enabled": True, "serve.explain": True}
    )
    assert not [s for s in chart.of_kind(docs, "Secret") if "api-keys" in s["metadata"]["name"]]
    head = next(s for w, s, _ in chart.pod_templates(docs) if w == "ray-head")
    assert "api-keys" not in {v["name"] for v in head["volumes"]}
    env = {k: e.get("value") for k, e in chart.container_env(head["containers"][0]).items()}
    assert env["RECSERVE_API__AUTH__ENABLED"] == "false"
    assert "RECSERVE_API__AUTH__KEYS_FILE" not in env
    assert (env["RECSERVE_DEMO__ENABLED"], env["RECSERVE_API__EXPLAIN_ENABLED"]) == ("true", "true")
