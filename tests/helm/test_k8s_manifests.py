"""k8s/: plain manifests for users without Helm. The base is the chart's rendering (kept in sync here),
the dev and prod overlays are built with kubectl's kustomize and validated like the chart."""

from __future__ import annotations

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
