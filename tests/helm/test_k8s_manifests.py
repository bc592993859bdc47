"""k8s/: plain manifests for users without Helm. The base is the chart's rendering (kept in sync here),
the dev and prod overlays are built with kubectl's kustomize and validated like the chart."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helm import chart

K8S = chart.REPO / "k8s"


def build(kubectl: Path, overlay: str) -> list[chart.Doc]:
    proc = subprocess.run(
        [str(kubectl), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return chart.parse_docs(proc.stdout)


def worker_group(docs: list[chart.Doc]) -> chart.Doc:
    group: chart.Doc = chart.one(docs, "RayService")["spec"]["rayClusterConfig"][
        "workerGroupSpecs"
    ][0]
    return group


def test_base_is_the_current_rendering_of_the_chart(helm: Path) -> None:
    fresh = chart.render_text([K8S / "base" / "values.yaml"])
    assert (K8S / "base" / "recserve.yaml").read_text() == fresh, (
        "k8s/base/recserve.yaml is stale: run bash scripts/sync-chart-files.sh"
    )


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_builds_and_every_object_validates(kubectl: Path, crds: Path, overlay: str) -> None:
    docs = build(kubectl, overlay)
    base = chart.parse_docs((K8S / "base" / "recserve.yaml").read_text())
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in base
    )
    for doc in docs:
        chart.validate_object(doc)
    # The serving graph is the chart's; overlays size the cluster, not the graph.
    assert chart.serve_config(docs) == chart.serve_config(base)


def test_dev_overlay_runs_one_small_worker_without_nightly_training(kubectl: Path) -> None:
    docs = build(kubectl, "dev")
    assert {d["metadata"]["namespace"] for d in docs} == {"recserve-dev"}
    group = worker_group(docs)
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 1, 1)
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"] == {"cpu": "2", "memory": "4Gi"}
    assert chart.one(docs, "CronJob", "recserve-training")["spec"]["suspend"] is True
    assert "suspend" not in chart.one(docs, "CronJob", "recserve-materialization")["spec"]


def test_prod_overlay_keeps_two_workers_and_a_shared_data_volume(kubectl: Path) -> None:
    docs = build(kubectl, "prod")
    assert {d["metadata"]["namespace"] for d in docs} == {"recserve"}
    group = worker_group(docs)
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (2, 2, 16)
    pvc = chart.one(docs, "PersistentVolumeClaim", "recserve-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # Two workers and maxUnavailable 1: a node drain always leaves one serving.
    assert chart.one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_create_secrets_makes_every_secret_the_base_reads(kubectl: Path) -> None:
    # k8s/create-secrets.sh --dry-run prints what it would create (kubectl's client-side dry run).
    proc = subprocess.run(
        ["bash", str(K8S / "create-secrets.sh"), "--dry-run", "recserve"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": os.environ["PATH"], "KUBECTL": str(kubectl)},
    )
    assert proc.returncode == 0, proc.stderr
    created = {d["metadata"]["name"]: d for d in chart.parse_docs(proc.stdout)}
    base = chart.parse_docs((K8S / "base" / "recserve.yaml").read_text())
    referenced: dict[str, set[str]] = {}
    for _, spec, _ in chart.pod_templates(base):
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    referenced.setdefault(ref["name"], set()).add(ref["key"])
        for v in spec.get("volumes", []):
            if "secret" in v:
                keys = {i["key"] for i in v["secret"].get("items", [])}
                referenced.setdefault(v["secret"]["secretName"], set()).update(keys)
    # The credentials the chart would generate; the rest (PostgreSQL URLs) are the user's.
    ours = {k: v for k, v in referenced.items() if k in created}
    assert set(ours) == {"recserve-api-keys", "recserve-redis-auth", "recserve-mlflow-auth"}
    for name, keys in ours.items():
        data = {k: base64.b64decode(v).decode() for k, v in created[name]["data"].items()}
        assert keys <= set(data), name
        assert created[name]["metadata"]["namespace"] == "recserve"
    keys_json = json.loads(
        base64.b64decode(created["recserve-api-keys"]["data"]["keys.json"]).decode()
    )
    plain = {
        k: base64.b64decode(created["recserve-api-keys"]["data"][f"{k}-key"]).decode()
        for k in ("client", "operator")
    }
    # Each hash is the sha256 of its key, computed here independently.
    assert keys_json == {
        "keys": [
            {
                "name": "client",
                "sha256": hashlib.sha256(plain["client"].encode()).hexdigest(),
                "scopes": ["recommend", "events"],
            },
            {
                "name": "operator",
                "sha256": hashlib.sha256(plain["operator"].encode()).hexdigest(),
                "scopes": ["recommend", "events", "admin", "debug"],
            },
        ]
    }
