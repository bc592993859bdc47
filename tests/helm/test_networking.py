"""templates/ingress.yaml, networkpolicy.yaml: the Ingress, and who may reach whom.

The NetworkPolicies are evaluated with Kubernetes' semantics (a pod selected by any policy admits only
what some rule of those policies allows; peers match by pod and namespace selectors) over the pods the
chart really creates, then compared with the matrix the issue asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helm import chart


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector; the empty selector selects everything."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present, value = expr["key"] in labels, labels.get(expr["key"])
        op = expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and present and value in expr["values"]:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


@dataclass(frozen=True)
class Pod:
    namespace: str
    namespace_labels: dict[str, str]
    labels: dict[str, str]


def allowed(policies: list[chart.Doc], source: Pod, target: Pod, port: int) -> bool:
    """Whether `source` may open a TCP connection to `target` on `port` (ingress rules only)."""
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == target.namespace
        and "Ingress" in p["spec"]["policyTypes"]
        and selects(p["spec"]["podSelector"], target.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and port not in [p["port"] for p in ports]:
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "namespaceSelector" in peer:
                    ns_ok = selects(peer["namespaceSelector"], source.namespace_labels)
                else:
                    ns_ok = source.namespace == target.namespace
                pod_ok = selects(peer.get("podSelector", {}), source.labels)
                if ns_ok and pod_ok:
                    return True
    return False


def release_pods(docs: tuple[chart.Doc, ...]) -> dict[str, Pod]:
    ns_labels = {"kubernetes.io/metadata.name": chart.NAMESPACE}
    pods = {}
    for where, _, labels in chart.pod_templates(docs):
        name = {
            "ray-head": "head",
            "ray-worker/cpu": "worker",
            "StatefulSet/recserve-redis": "redis",
            "Deployment/recserve-mlflow": "mlflow",
            "CronJob/recserve-training": "training",
            "CronJob/recserve-materialization": "materialization",
        }[where]
        pods[name] = Pod(chart.NAMESPACE, ns_labels, labels)
    return pods


def outside(namespace: str, labels: dict[str, str] | None = None) -> Pod:
    return Pod(namespace, {"kubernetes.io/metadata.name": namespace}, labels or {"app": "x"})


def test_reachability_matches_the_issue(helm: Path) -> None:
    docs = chart.render_profile("default")
    policies = chart.of_kind(docs, "NetworkPolicy")
    pods = release_pods(docs)
    ingress = outside("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    stranger = Pod(chart.NAMESPACE, pods["head"].namespace_labels, {"app": "stranger"})
    operator = outside("kuberay-operator")
    prometheus = outside("monitoring")

    def ok(source: Pod, target: str, port: int) -> bool:
        return allowed(policies, source, pods[target], port)

    # Only the ingress reaches serve, and only on the Serve port.
    assert ok(ingress, "worker", 8000) and ok(ingress, "head", 8000)
    assert not ok(ingress, "head", 6379) and not ok(ingress, "worker", 8080)
    assert not ok(stranger, "worker", 8000) and not ok(outside("default"), "head", 8000)
    # Only serve and the jobs reach Redis and MLflow.
    for client in ("head", "worker", "training", "materialization"):
        assert ok(pods[client], "redis", 6379), client
        assert ok(pods[client], "mlflow", 5000), client
    for source in (ingress, stranger, operator, prometheus, pods["mlflow"]):
        assert not ok(source, "redis", 6379)
    for source in (ingress, stranger, pods["redis"]):
        assert not ok(source, "mlflow", 5000)
    # Ray's own ports between Ray pods; the operator reads the dashboard; Prometheus scrapes metrics.
    assert ok(pods["worker"], "head", 6379) and ok(pods["head"], "worker", 10002)
    assert ok(operator, "head", 8265) and not ok(operator, "head", 6379)
    assert ok(prometheus, "worker", 8080) and ok(prometheus, "head", 44217)
    assert not ok(prometheus, "redis", 6379)
    # Nothing reaches the jobs.
    for source in (ingress, stranger, pods["head"], pods["redis"]):
        assert not ok(source, "training", 8080) and not ok(source, "materialization", 8080)


def test_without_policies_everything_is_reachable(helm: Path) -> None:
    # The evaluator is not a constant "deny": with networkPolicy.enabled=false it admits everything.
    docs = tuple(chart.render(set_json={"networkPolicy.enabled": False}))
    assert chart.of_kind(docs, "NetworkPolicy") == []
    pods = release_pods(docs)
    assert allowed([], outside("default"), pods["redis"], 6379)


def test_policies_select_the_release_pods_they_name(helm: Path) -> None:
    docs = chart.render_profile("default")
    pods = release_pods(docs)
    selected = {
        p["metadata"]["name"]: sorted(
            name for name, pod in pods.items() if selects(p["spec"]["podSelector"], pod.labels)
        )
        for p in chart.of_kind(docs, "NetworkPolicy")
    }
    assert selected == {
        "recserve-serve": ["head", "worker"],
        "recserve-redis": ["redis"],
        "recserve-mlflow": ["mlflow"],
        "recserve-jobs": ["materialization", "training"],
    }


def test_ingress_class_tls_and_annotations_come_from_values(helm: Path) -> None:
    ingress = chart.one(chart.render_profile("production"), "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["recs.example.com"], "secretName": "recserve-tls"}]
    assert ingress["metadata"]["annotations"] == {"cert-manager.io/cluster-issuer": "letsencrypt"}
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "recs.example.com"
    assert rule["http"]["paths"][0]["path"] == "/"


@pytest.mark.parametrize("profile", ["default", "minimal"])
def test_ingress_is_off_unless_enabled(helm: Path, profile: str) -> None:
    assert chart.of_kind(chart.render_profile(profile), "Ingress") == []
