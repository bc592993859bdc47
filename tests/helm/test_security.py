"""templates/serviceaccount.yaml, poddisruptionbudget.yaml and the security of every pod template:
the restricted Pod Security Standard, least RBAC, Secrets only by reference."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.helm import chart

# Besides the profiles: every optional path on (bundled Redis with auth, ingress, monitoring CRs).
FULL = {
    "redis.auth.existingSecret": "redis-auth",
    "ingress.enabled": True,
    "monitoring.podMonitor.enabled": True,
    "monitoring.serviceMonitor.enabled": True,
}
# Volume types the restricted Pod Security Standard admits.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def renderings() -> list[tuple[str, tuple[chart.Doc, ...]]]:
    out = [(p, chart.render_profile(p)) for p in chart.PROFILES]
    out.append(("full", tuple(chart.render(set_json=FULL))))
    return out


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = spec["containers"] + spec.get("initContainers", [])
    return containers


def test_every_pod_meets_the_restricted_pod_security_standard(helm: Path) -> None:
    checked = 0
    for name, docs in renderings():
        for where, spec, _ in chart.pod_templates(docs):
            at = f"{name}:{where}"
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] is True, at
            assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, at
            assert pod["runAsUser"] != 0, at
            for key in ("hostNetwork", "hostPID", "hostIPC"):
                assert not spec.get(key), at
            for volume in spec.get("volumes", []):
                assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, at
            for container in all_containers(spec):
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, at
                assert sc["capabilities"] == {"drop": ["ALL"]}, at
                assert sc["readOnlyRootFilesystem"] is True, at
                assert not sc.get("privileged"), at
                checked += 1
    assert checked >= 20


def test_every_container_has_cpu_and_memory_requests_and_limits(helm: Path) -> None:
    for name, docs in renderings():
        for where, spec, _ in chart.pod_templates(docs):
            for container in all_containers(spec):
                resources = container["resources"]
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(resources[kind]), f"{name}:{where}:{kind}"


def test_the_autoscaler_sidecar_is_restricted_too(helm: Path) -> None:
    options = chart.one(chart.render_profile("default"), "RayService")["spec"]["rayClusterConfig"][
        "autoscalerOptions"
    ]
    assert options["securityContext"]["readOnlyRootFilesystem"] is True
    assert options["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"cpu", "memory"} <= set(options["resources"]["limits"])


def test_writable_paths_are_volumes(helm: Path) -> None:
    # A read-only root: whatever a process writes must be on a mount (Ray: /tmp and /dev/shm; the
    # EventWriter's spool).
    docs = chart.render_profile("default")
    spool = "/var/lib/recserve/event-spool"
    expected = {
        "ray-head": {"/tmp", "/dev/shm", spool},
        "ray-worker/cpu": {"/tmp", "/dev/shm", spool},
        "StatefulSet/recserve-redis": {"/data"},
        "Deployment/recserve-mlflow": {"/tmp", "/mlflow/artifacts", "/mlflow/auth"},
        "CronJob/recserve-training": {"/tmp", "/data"},
        "CronJob/recserve-materialization": {"/tmp", "/data"},
    }
    writable = {
        where: {
            m["mountPath"]
            for m in spec["containers"][0].get("volumeMounts", [])
            if not m.get("readOnly")
        }
        for where, spec, _ in chart.pod_templates(docs)
    }
    assert writable == expected
    # Credentials and configuration are mounted read-only.
    read_only = {
        where: {
            m["mountPath"]
            for m in spec["containers"][0].get("volumeMounts", [])
            if m.get("readOnly")
        }
        for where, spec, _ in chart.pod_templates(docs)
    }
    assert read_only["ray-head"] == read_only["ray-worker/cpu"] == {"/etc/recserve/api-keys"}
    assert read_only["Deployment/recserve-mlflow"] == {"/etc/mlflow-auth"}


def test_only_the_ray_head_mounts_a_service_account_token(helm: Path) -> None:
    docs = chart.render_profile("default")
    account = chart.one(docs, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    mounting = {
        where
        for where, spec, _ in chart.pod_templates(docs)
        if spec["automountServiceAccountToken"] is not False
    }
    assert mounting == {"ray-head"}
    for _, spec, _ in chart.pod_templates(docs):
        assert spec["serviceAccountName"] == "recserve"


# The only Secrets the chart writes: credentials it generates (random at the first install, read back on
# upgrades) when no existing Secret is named.
GENERATED_SECRETS = {"recserve-api-keys", "recserve-redis-auth", "recserve-mlflow-auth"}


def test_the_chart_grants_no_rbac_and_ships_only_generated_kept_secrets(helm: Path) -> None:
    for name, docs in renderings():
        kinds = {d["kind"] for d in docs}
        assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}, name
        for secret in chart.of_kind(docs, "Secret"):
            assert secret["metadata"]["name"] in GENERATED_SECRETS, name
            # Kept on uninstall and never re-rolled on upgrade (templates use `lookup`).
            assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # Naming existing Secrets: the chart writes none.
    docs = chart.render(
        set_json={
            "auth.existingSecret": "keys",
            "redis.auth.existingSecret": "redis",
            "mlflow.auth.existingSecret": "mlflow",
        }
    )
    assert chart.of_kind(docs, "Secret") == []
    # ...nor do the plain manifests (k8s/create-secrets.sh creates them once).
    base = chart.parse_docs((chart.REPO / "k8s" / "base" / "recserve.yaml").read_text())
    assert chart.of_kind(base, "Secret") == []


_SENSITIVE = re.compile(
    r"PASSWORD|SECRET|API_KEY|BACKEND_STORE_URI|REGISTRY_URL|ACCESS_KEY|TRACKING_USERNAME"
)


def test_credentials_reach_pods_only_by_secret_reference(helm: Path) -> None:
    seen = set()
    for name, docs in renderings():
        for where, spec, _ in chart.pod_templates(docs):
            for container in all_containers(spec):
                for entry in container.get("env", []):
                    if _SENSITIVE.search(entry["name"]):
                        assert "secretKeyRef" in entry.get("valueFrom", {}), (name, where, entry)
                        seen.add(entry["name"])
                    if entry["name"] == "REDIS_URL" and "value" in entry:
                        # A literal URL carries no password: at most a $(REDIS_PASSWORD) reference.
                        assert "@" not in entry["value"] or "$(REDIS_PASSWORD)@" in entry["value"]
    assert {
        "REDIS_PASSWORD",
        "REDIS_ADMIN_PASSWORD",
        "RECSERVE_API__ADMIN_API_KEY",
        "MLFLOW_BACKEND_STORE_URI",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "RECSERVE_FEATURE_STORE__REGISTRY_URL",
    } <= seen


@pytest.mark.parametrize("profile", ["default", "production"])
def test_pdb_covers_exactly_the_ray_workers(helm: Path, profile: str) -> None:
    docs = chart.render_profile(profile)
    pdb = chart.one(docs, "PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    covered = {
        where
        for where, _, labels in chart.pod_templates(docs)
        if selector.items() <= labels.items()
    }
    assert covered == {w for w, _, _ in chart.pod_templates(docs) if w.startswith("ray-worker/")}
    assert covered
    assert pdb["spec"]["maxUnavailable"] == 1


def test_pdb_is_off_in_the_minimal_profile(helm: Path) -> None:
    assert chart.of_kind(chart.render_profile("minimal"), "PodDisruptionBudget") == []
