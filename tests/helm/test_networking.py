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
    """A pod (or, with external=True, an address outside the cluster: only ipBlocks and rules
    without peers match it)."""

    namespace: str
    namespace_labels: dict[str, str]
    labels: dict[str, str]
    external: bool = False


def _port_matches(rule_ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        low = p["port"]
        if low <= port <= p.get("endPort", low):
            return True
    return False


def _peer_matches(peer: dict[str, Any], policy_namespace: str, other: Pod) -> bool:
    if "ipBlock" in peer:
        return other.external  # the chart uses ipBlocks for addresses outside the cluster only
    if other.external:
        return False
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], other.namespace_labels)
    else:
        ns_ok = other.namespace == policy_namespace
    return ns_ok and selects(peer.get("podSelector", {}), other.labels)


def _admitted(
    policies: list[chart.Doc], kind: str, pod: Pod, other: Pod, port: int, protocol: str
) -> bool:
    """Whether the policies of `kind` (Ingress: on the target `pod`, from `other`; Egress: on the
    source `pod`, to `other`) admit the connection: no policy of that kind selects the pod, or a
    rule of one of them allows it."""
    if pod.external:
        return True
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod.namespace
        and kind in p["spec"]["policyTypes"]
        and selects(p["spec"]["podSelector"], pod.labels)
    ]
    if not selecting:
        return True
    field, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    for policy in selecting:
        for rule in policy["spec"].get(field, []):
            if not _port_matches(rule.get("ports"), port, protocol):
                continue
            peers = rule.get(peers_key)
            if not peers or any(
                _peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers
            ):
                return True
    return False


def allowed(
    policies: list[chart.Doc], source: Pod, target: Pod, port: int, protocol: str = "TCP"
) -> bool:
    """Whether `source` may open a connection to `target` on `port`: the source's egress policies
    and the target's ingress policies must both admit it."""
    return _admitted(policies, "Egress", source, target, port, protocol) and _admitted(
        policies, "Ingress", target, source, port, protocol
    )


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


INTERNET = Pod("", {}, {}, external=True)
KUBE_DNS = outside("kube-system", {"k8s-app": "kube-dns"})


def test_reachability_matches_the_issue(helm: Path) -> None:
    docs = chart.render_profile("default")
    policies = chart.of_kind(docs, "NetworkPolicy")
    pods = release_pods(docs)
    ingress = outside("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    stranger = Pod(chart.NAMESPACE, pods["head"].namespace_labels, {"app": "stranger"})
    operator = outside("kuberay-operator", {"app.kubernetes.io/name": "kuberay-operator"})
    operator_neighbour = outside("kuberay-operator", {"app": "other"})
    prometheus = outside("monitoring")

    def ok(source: Pod | str, target: Pod | str, port: int, protocol: str = "TCP") -> bool:
        src = pods[source] if isinstance(source, str) else source
        dst = pods[target] if isinstance(target, str) else target
        return allowed(policies, src, dst, port, protocol)

    # Only the ingress reaches serve, and only on the Serve port.
    assert ok(ingress, "worker", 8000) and ok(ingress, "head", 8000)
    assert not ok(ingress, "head", 6379) and not ok(ingress, "worker", 8080)
    assert not ok(stranger, "worker", 8000) and not ok(outside("default"), "head", 8000)
    # Only serve and the jobs reach Redis and MLflow (both sides: their egress, its ingress).
    for client in ("head", "worker", "training", "materialization"):
        assert ok(client, "redis", 6379), client
        assert ok(client, "mlflow", 5000), client
    for source in (ingress, stranger, operator, prometheus, pods["mlflow"]):
        assert not ok(source, "redis", 6379)
    for source in (ingress, stranger, pods["redis"]):
        assert not ok(source, "mlflow", 5000)
    # Ray's own ports between Ray pods, but the dashboard (job API): the KubeRay operator alone.
    assert (
        ok("worker", "head", 6379) and ok("head", "worker", 10002) and ok("worker", "worker", 8000)
    )
    assert not ok("worker", "head", 8265) and not ok("head", "head", 8265)
    assert ok(operator, "head", 8265) and ok(operator, "head", 52365)
    assert not ok(operator_neighbour, "head", 8265) and not ok(stranger, "head", 8265)
    assert not ok(ingress, "head", 8265) and not ok(prometheus, "head", 8265)
    assert not ok(operator, "head", 6379) and not ok(operator, "worker", 8265)
    assert ok(prometheus, "worker", 8080) and ok(prometheus, "head", 44217)
    assert not ok(prometheus, "redis", 6379)
    # Nothing reaches the jobs.
    for source in (ingress, stranger, pods["head"], pods["redis"]):
        assert not ok(source, "training", 8080) and not ok(source, "materialization", 8080)
    # Egress: DNS for every pod that resolves names; Redis sends nothing at all.
    for name in ("head", "worker", "mlflow", "training", "materialization"):
        assert ok(name, KUBE_DNS, 53, "UDP") and ok(name, KUBE_DNS, 53), name
        assert not ok(name, outside("kube-system", {"k8s-app": "other"}), 53, "UDP"), name
        assert not ok(name, INTERNET, 443) or name == "head", name  # the API server: head only
        assert not ok(name, INTERNET, 80), name
        assert ok(name, INTERNET, 5432), name  # PostgreSQL (externalEgress)
    assert not ok("redis", KUBE_DNS, 53, "UDP") and not ok("redis", INTERNET, 5432)
    assert not ok("redis", "head", 8000) and not ok("redis", "mlflow", 5000)
    # Jobs and MLflow do not reach the Ray pods; serve pods do not reach a stranger.
    assert not ok("training", "head", 8265) and not ok("training", "worker", 8000)
    assert not ok("mlflow", "worker", 8000)
    assert not ok("worker", stranger, 8000) and not ok("head", outside("default"), 5000)
    # The Ray head's autoscaler patches the RayCluster through the API server.
    assert ok("head", INTERNET, 443) and ok("head", INTERNET, 6443)
    assert not ok("worker", INTERNET, 6443)


def test_default_deny_selects_every_pod_of_the_release_both_ways(helm: Path) -> None:
    docs = chart.render_profile("default")
    deny = chart.one(docs, "NetworkPolicy", "recserve-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    pods = release_pods(docs)
    assert all(selects(deny["spec"]["podSelector"], pod.labels) for pod in pods.values())
    # Alone, it admits nothing: not even DNS.
    assert not allowed([deny], pods["worker"], KUBE_DNS, 53, "UDP")
    assert not allowed([deny], pods["worker"], pods["redis"], 6379)


def test_internal_ingress_controller_reaches_the_serve_port_when_enabled(helm: Path) -> None:
    internal = outside("ingress-nginx-internal", {"app": "controller"})
    docs = chart.render_profile("default")
    assert not allowed(
        chart.of_kind(docs, "NetworkPolicy"), internal, release_pods(docs)["worker"], 8000
    )
    docs = tuple(chart.render(set_json={"internalIngress.enabled": True}))
    policies = chart.of_kind(docs, "NetworkPolicy")
    worker = release_pods(docs)["worker"]
    assert allowed(policies, internal, worker, 8000)
    assert not allowed(policies, internal, worker, 8265)


def test_external_services_get_their_port_only(helm: Path) -> None:
    # Production: PostgreSQL and the managed Redis in their subnet; MLflow's S3 store on 443.
    docs = chart.render_profile("production")
    policies = chart.of_kind(docs, "NetworkPolicy")
    pods = {
        where: Pod(chart.NAMESPACE, {"kubernetes.io/metadata.name": chart.NAMESPACE}, labels)
        for where, _, labels in chart.pod_templates(docs)
    }
    worker = pods["ray-worker/frontend"]
    assert allowed(policies, worker, INTERNET, 6379) and allowed(policies, worker, INTERNET, 5432)
    assert not allowed(policies, worker, INTERNET, 443)
    mlflow = pods["Deployment/recserve-mlflow"]
    assert allowed(policies, mlflow, INTERNET, 443) and allowed(policies, mlflow, INTERNET, 5432)
    egress = chart.one(docs, "NetworkPolicy", "recserve-serve")["spec"]["egress"]
    assert {"ipBlock": {"cidr": "10.20.0.0/16"}} in [
        p for rule in egress for p in rule.get("to", [])
    ]
    # An external MLflow: its URL's port; a MinIO endpoint: its port.
    docs = tuple(
        chart.render(
            set_json={
                "mlflow.enabled": False,
                "mlflow.external.trackingUri": "https://mlflow.example.com",
            }
        )
    )
    head = release_pods(docs)["head"]
    assert allowed(chart.of_kind(docs, "NetworkPolicy"), head, INTERNET, 443)
    docs = tuple(
        chart.render(
            set_json={
                "mlflow.artifacts.s3Uri": "s3://models/mlflow",
                "mlflow.artifacts.s3EndpointUrl": "http://minio.storage:9000",
            }
        )
    )
    mlflow = release_pods(docs)["mlflow"]
    policies = chart.of_kind(docs, "NetworkPolicy")
    assert allowed(policies, mlflow, INTERNET, 9000) and not allowed(
        policies, mlflow, INTERNET, 443
    )


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
        "recserve-default-deny": sorted(pods),
        "recserve-dns": ["head", "materialization", "mlflow", "training", "worker"],
        "recserve-serve": ["head", "worker"],
        "recserve-ray-head": ["head"],
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


@pytest.mark.parametrize("profile", ["default", "production"])
def test_public_ingress_routes_exactly_the_two_client_paths(helm: Path, profile: str) -> None:
    docs = chart.render(
        [chart.CHART / "ci" / f"{profile}-values.yaml"], set_json={"ingress.enabled": True}
    )
    ingress = chart.one(docs, "Ingress", "recserve")
    for rule in ingress["spec"]["rules"]:
        paths = rule["http"]["paths"]
        assert [(p["path"], p["pathType"]) for p in paths] == [
            ("/v1/recommendations", "Exact"),
            ("/v1/events", "Exact"),
        ]
        for path in paths:
            assert path["backend"] == {
                "service": {"name": "recserve-serve", "port": {"name": "serve"}}
            }
    # Admin, docs, OpenAPI, experiments, the demo: no public rule reaches them.
    routed = {p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
    for private in ("/", "/v1/admin/reload", "/docs", "/openapi.json", "/v1/experiments", "/demo"):
        assert private not in routed
    assert chart.of_kind(docs, "Ingress") == [ingress]  # the internal Ingress is off by default


def test_a_path_list_in_values_is_refused(helm: Path) -> None:
    # The public routes are the chart's, not a value: `paths` (the old format) is refused by name.
    with pytest.raises(chart.HelmError, match="additional properties 'paths' not allowed"):
        chart.render(set_json={"ingress.hosts": [{"host": "x", "paths": [{"path": "/"}]}]})


def test_internal_service_and_ingress_carry_every_route(helm: Path) -> None:
    docs = chart.render(
        set_json={
            "internalIngress.enabled": True,
            "internalIngress.className": "nginx-internal",
            "internalIngress.hosts": [{"host": "recs.corp"}],
        }
    )
    service = chart.one(docs, "Service", "recserve-internal")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "serve", "protocol": "TCP"}
    ]
    # The Ray worker pods (as the serve Service, whose head is excluded), not the head, nor Redis.
    pods = release_pods(tuple(docs))
    selector = {"matchLabels": service["spec"]["selector"]}
    selected = {name for name, pod in pods.items() if selects(selector, pod.labels)}
    assert selected == {"worker"}
    internal = chart.one(docs, "Ingress", "recserve-internal")
    assert internal["spec"]["ingressClassName"] == "nginx-internal"
    (rule,) = internal["spec"]["rules"]
    assert rule["host"] == "recs.corp"
    assert rule["http"]["paths"] == [
        {
            "path": "/",
            "pathType": "Prefix",
            "backend": {"service": {"name": "recserve-internal", "port": {"name": "http"}}},
        }
    ]


@pytest.mark.parametrize("profile", ["default", "minimal"])
def test_ingress_is_off_unless_enabled(helm: Path, profile: str) -> None:
    assert chart.of_kind(chart.render_profile(profile), "Ingress") == []
