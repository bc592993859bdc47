"""templates/mlflow-*.yaml: the MLflow tracking server (PostgreSQL URL from a Secret, artifacts on a PVC
or S3, basic auth with the admin account from a Secret) or an external tracking URI. Arguments and Host
rules are checked with MLflow's own code; the rendered server runs here and refuses anonymous calls."""

from __future__ import annotations

import base64
import configparser
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helm import chart
from tests.helm.redis_server import free_port


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
    args = container["args"]
    assert args[args.index("--artifacts-destination") + 1] == "s3://recserve-models/mlflow"
    # No artifact PVC; the auth config from production's Secret (its user store in PostgreSQL).
    assert [m["name"] for m in container["volumeMounts"]] == ["tmp", "auth-config"]
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


# --- basic auth --------------------------------------------------------------------------------------


def secret_data(docs: tuple[chart.Doc, ...] | list[chart.Doc], name: str) -> dict[str, str]:
    secret = chart.one(docs, "Secret", name)
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_server_runs_the_basic_auth_app_with_its_secret_and_user_store(helm: Path) -> None:
    from mlflow.cli import server

    docs = chart.render_profile("default")
    container = mlflow_container(docs)
    params = server.make_context("server", list(container["args"])).params
    assert params["app_name"] == "basic-auth"
    env = chart.container_env(container)
    for name, key in (
        ("MLFLOW_AUTH_ADMIN_USERNAME", "username"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key"),
    ):
        assert env[name]["valueFrom"] == {
            "secretKeyRef": {"name": "recserve-mlflow-auth", "key": key}
        }
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/etc/mlflow-auth/basic_auth.ini"
    generated = secret_data(docs, "recserve-mlflow-auth")
    assert generated["username"] == "admin"
    assert re.fullmatch(r"[A-Za-z0-9]{40}", generated["password"])
    assert chart.one(docs, "Secret", "recserve-mlflow-auth")["metadata"]["annotations"] == {
        "helm.sh/resource-policy": "keep"
    }
    # The user store: SQLite on its own kept PVC; the ini read by MLflow's own parser.
    pod = chart.one(docs, "Deployment", "recserve-mlflow")["spec"]["template"]["spec"]
    assert {
        "name": "auth-db",
        "persistentVolumeClaim": {"claimName": "recserve-mlflow-auth"},
    } in pod["volumes"]
    claim = chart.one(docs, "PersistentVolumeClaim", "recserve-mlflow-auth")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    ini = chart.one(docs, "ConfigMap", "recserve-mlflow-auth")["data"]["basic_auth.ini"]
    config = configparser.ConfigParser()
    config.read_string(ini)
    assert config["mlflow"]["database_uri"] == "sqlite:////mlflow/auth/basic_auth.db"
    assert config["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert "admin_password" not in config["mlflow"]  # from the Secret, never from a ConfigMap


def test_recserve_pods_get_the_mlflow_credentials(helm: Path) -> None:
    docs = chart.render_profile("default")
    for where, spec, _ in chart.pod_templates(docs):
        if where in ("Deployment/recserve-mlflow", "StatefulSet/recserve-redis"):
            continue
        env = chart.container_env(spec["containers"][0])
        for name, key in (
            ("MLFLOW_TRACKING_USERNAME", "username"),
            ("MLFLOW_TRACKING_PASSWORD", "password"),
        ):
            assert env[name]["valueFrom"] == {
                "secretKeyRef": {"name": "recserve-mlflow-auth", "key": key}
            }, where
    # An external server: its credentials Secret, when named; none otherwise.
    head = chart.container_env(
        chart.one(chart.render_profile("minimal"), "RayService")["spec"]["rayClusterConfig"][
            "headGroupSpec"
        ]["template"]["spec"]["containers"][0]
    )
    assert "MLFLOW_TRACKING_PASSWORD" not in head
    docs = chart.render(
        [chart.CHART / "ci" / "minimal-values.yaml"],
        set_json={"mlflow.external.credentialsSecret": "mlflow-creds"},
    )
    head = chart.container_env(
        chart.one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"][
            "spec"
        ]["containers"][0]
    )
    assert head["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "mlflow-creds",
        "key": "password",
    }


def test_a_config_secret_replaces_the_sqlite_user_store(helm: Path) -> None:
    docs = chart.render_profile("production")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("ConfigMap", "recserve-mlflow-auth") not in names
    assert ("PersistentVolumeClaim", "recserve-mlflow-auth") not in names
    assert ("Secret", "recserve-mlflow-auth") not in names  # an existing one is named
    pod = chart.one(docs, "Deployment", "recserve-mlflow")["spec"]["template"]["spec"]
    assert {
        "name": "auth-config",
        "secret": {
            "secretName": "recserve-mlflow-auth-config",
            "items": [{"key": "basic_auth.ini", "path": "basic_auth.ini"}],
        },
    } in pod["volumes"]
    # No PVC at all (S3 artifacts, user store in PostgreSQL): rolling updates stay possible.
    assert "strategy" not in chart.one(docs, "Deployment", "recserve-mlflow")["spec"]


def test_s3_artifacts_with_the_sqlite_user_store_recreate_the_pod(helm: Path) -> None:
    docs = chart.render(set_json={"mlflow.artifacts.s3Uri": "s3://b/p"})
    assert chart.one(docs, "Deployment", "recserve-mlflow")["spec"]["strategy"] == {
        "type": "Recreate"
    }


@pytest.fixture
def mlflow_with_auth(helm: Path, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The rendered MLflow container run here: its command, args and env, with the Secret's and the
    ConfigMap's contents, and local paths for the PVCs and the PostgreSQL backend store."""
    docs = chart.render_profile("default")
    container = mlflow_container(docs)
    secret = secret_data(docs, "recserve-mlflow-auth")
    ini = chart.one(docs, "ConfigMap", "recserve-mlflow-auth")["data"]["basic_auth.ini"]
    (tmp_path / "auth").mkdir()
    (tmp_path / "basic_auth.ini").write_text(
        ini.replace("sqlite:////mlflow/auth/", f"sqlite:///{tmp_path}/auth/")
    )
    port = free_port()
    env = dict(os.environ)
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            if ref["name"] == "recserve-mlflow-auth":
                env[entry["name"]] = secret[ref["key"]]
    env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "basic_auth.ini")
    env["HOME"] = str(tmp_path)
    args = [a.replace("/mlflow/artifacts", str(tmp_path / "artifacts")) for a in container["args"]]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    process = subprocess.Popen(
        [str(mlflow_bin), *container["command"][1:], *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "server.log").open("wb"),
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError((tmp_path / "server.log").read_text()[-3000:])
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError((tmp_path / "server.log").read_text()[-3000:])
            time.sleep(0.2)
        yield url, secret
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_refuses_anonymous_calls_and_admits_the_pods_credentials(
    mlflow_with_auth: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    url, secret = mlflow_with_auth
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=10"
    assert httpx.get(f"{url}/health").status_code == 200  # the probes need no user
    assert httpx.get(search).status_code == 401
    assert httpx.get(search, auth=(secret["username"], "wrong-password")).status_code == 401
    assert httpx.get(search, auth=(secret["username"], secret["password"])).status_code == 200
    # The client as training and serving run it: credentials from the environment (the Secret).
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", secret["username"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret["password"])
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    experiment = client.create_experiment("recserve-auth-check")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "recall", 0.5)
    client.create_registered_model("recserve")
    assert client.get_registered_model("recserve").name == "recserve"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
    with pytest.raises(mlflow.exceptions.MlflowException):
        MlflowClient(tracking_uri=url).get_experiment(experiment)
