"""templates/mlflow-*.yaml: the MLflow tracking server (PostgreSQL URL from a Secret, artifacts on a PVC
or S3) or an external tracking URI. Arguments and Host rules are checked with MLflow's own code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helm import chart


def mlflow_container(docs: tuple[chart.Doc, ...] | list[chart.Doc]) -> dict[str, Any]:
    deployment = chart.one(docs, "Deployment", "recserve-mlflow")
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def test_backend_store_url_comes_from_a_secret(helm: Path) -> None:
    env = chart.container_env(mlflow_container(chart.render_profile("default")))
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"] == {
        "secretKeyRef": {"name": "recserve-mlflow", "key": "backend-store-uri"}
    }
    env = chart.container_env(mlflow_container(chart.render_profile("production")))
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == (
        "recserve-mlflow-db"
    )


def test_server_arguments_parse_with_the_mlflow_cli(helm: Path) -> None:
    from mlflow.cli import server

    container = mlflow_container(chart.render_profile("default"))
    assert container["command"] == ["mlflow", "server"]
    params = server.make_context("server", list(container["args"])).params
    assert params["serve_artifacts"] is True
    assert params["artifacts_destination"] == "/mlflow/artifacts"
    assert (params["host"], params["port"]) == ("0.0.0.0", 5000)


def test_artifacts_on_a_pvc_by_default(helm: Path) -> None:
    docs = chart.render_profile("default")
    deployment = chart.one(docs, "Deployment", "recserve-mlflow")
    pod = deployment["spec"]["template"]["spec"]
    claim = chart.one(docs, "PersistentVolumeClaim", "recserve-mlflow-artifacts")
    assert {
        "name": "artifacts",
        "persistentVolumeClaim": {"claimName": "recserve-mlflow-artifacts"},
    } in pod["volumes"]
    assert {"name": "artifacts", "mountPath": "/mlflow/artifacts"} in pod["containers"][0][
        "volumeMounts"
    ]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    # Registered versions must outlive `helm uninstall`.
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # A ReadWriteOnce volume: the old pod releases it before the new one mounts it.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_s3_artifacts_need_no_pvc_and_take_endpoint_and_credentials(helm: Path) -> None:
    docs = chart.render(
        [chart.CHART / "ci" / "production-values.yaml"],
        set_json={
            "mlflow.artifacts.s3EndpointUrl": "http://minio:9000",
            "mlflow.artifacts.s3CredentialsSecret": "s3-creds",
        },
    )
    container = mlflow_container(docs)
    assert "recserve-mlflow-artifacts" not in {
        d["metadata"]["name"] for d in chart.of_kind(docs, "PersistentVolumeClaim")
    }
    assert container["args"][-1] == "s3://recserve-models/mlflow"
    assert [m["name"] for m in container["volumeMounts"]] == ["tmp"]
    env = chart.container_env(container)
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio:9000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": key}}
    assert "strategy" not in chart.one(docs, "Deployment", "recserve-mlflow")["spec"]


def test_server_accepts_its_service_names_and_refuses_other_hosts(helm: Path) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    env = chart.container_env(mlflow_container(chart.render_profile("default")))
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    for host in (
        "recserve-mlflow",
        "recserve-mlflow:5000",
        "recserve-mlflow.recserve.svc.cluster.local:5000",
        "localhost:5000",
    ):
        assert is_allowed_host_header(allowed, host), host
    for host in ("evil.example.com", "recserve-redis:6379"):
        assert not is_allowed_host_header(allowed, host), host


def test_service_targets_the_server_port_and_probes_use_health(helm: Path) -> None:
    docs = chart.render_profile("default")
    service = chart.one(docs, "Service", "recserve-mlflow")
    deployment = chart.one(docs, "Deployment", "recserve-mlflow")
    container = mlflow_container(docs)
    assert service["spec"]["selector"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert service["spec"]["ports"] == [{"name": "http", "port": 5000, "targetPort": "http"}]
    assert {"name": "http", "containerPort": 5000} in container["ports"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}


def test_external_tracking_uri_replaces_the_bundled_server(helm: Path) -> None:
    docs = chart.render_profile("minimal")
    assert not [d for d in docs if "mlflow" in d["metadata"]["name"]]
    head = chart.one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    env = chart.container_env(head["template"]["spec"]["containers"][0])
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.mlflow.svc:5000"


def test_disabling_mlflow_without_an_external_uri_is_refused_with_a_reason(helm: Path) -> None:
    with pytest.raises(chart.HelmError, match=r"mlflow\.external\.trackingUri is required"):
        chart.render(set_json={"mlflow.enabled": False})
