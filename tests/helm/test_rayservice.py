"""templates/rayservice.yaml: the KubeRay RayService, its serveConfigV2 and the Ray pods' environment.

The serve config is checked against its one source (serve_app/serve_config.yaml) and Ray Serve's own
schema; the RayService against the KubeRay CRDs; the pods' environment by building the app's real
settings objects from it.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helm import chart

SERVE_CONFIG_YAML = chart.REPO / "serve_app" / "serve_config.yaml"
# The graph of ARCHITECTURE.md; serve_config.yaml must name exactly these (checked below too).
GRAPH = {"Ingress", "UserTower", "Retriever", "Ranker", "ReRanker", "EventWriter"}


def source_serve_config() -> dict[str, Any]:
    # Not a skip: the serving graph exists, so its config file must too.
    assert SERVE_CONFIG_YAML.exists(), (
        "serve_app/serve_config.yaml is missing: the chart's serve.deployments mirror it"
    )
    config = yaml.safe_load(SERVE_CONFIG_YAML.read_text())
    assert isinstance(config, dict)
    return config


def deployments_by_name(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (app,) = config["applications"]
    names = [d["name"] for d in app["deployments"]]
    assert len(names) == len(set(names)), f"duplicate deployment names: {names}"
    return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}


@pytest.mark.parametrize("profile", chart.PROFILES)
def test_serve_config_names_exactly_the_deployments_of_serve_config_yaml(
    helm: Path, profile: str
) -> None:
    source = deployments_by_name(source_serve_config())
    rendered = deployments_by_name(chart.serve_config(chart.render_profile(profile)))
    assert set(source) == GRAPH
    assert set(rendered) == set(source)


@pytest.mark.parametrize("profile", chart.PROFILES)
def test_serve_config_import_path_and_app_match_serve_config_yaml(helm: Path, profile: str) -> None:
    (source_app,) = source_serve_config()["applications"]
    (app,) = chart.serve_config(chart.render_profile(profile))["applications"]
    assert app["import_path"] == source_app["import_path"] == "serve_app.app:build_app"
    assert app["route_prefix"] == source_app["route_prefix"]
    assert app["name"] == source_app["name"]


def test_default_profile_renders_the_deployment_settings_of_serve_config_yaml(helm: Path) -> None:
    # Same autoscaling, resources, queues, health checks: the chart's defaults are the file's.
    source = source_serve_config()
    rendered = chart.serve_config(chart.render_profile("default"))
    assert deployments_by_name(rendered) == deployments_by_name(source)
    assert rendered["logging_config"] == source["logging_config"]
    # Only where the proxies listen differs: every node's pod IP instead of one machine's loopback.
    assert rendered["proxy_location"] == "EveryNode"
    assert rendered["http_options"] == {**source["http_options"], "host": "0.0.0.0"}


def test_production_profile_overrides_only_what_it_names(helm: Path) -> None:
    source = deployments_by_name(source_serve_config())
    rendered = deployments_by_name(chart.serve_config(chart.render_profile("production")))
    ranker = rendered["Ranker"]
    assert ranker["autoscaling_config"]["max_replicas"] == 32
    assert ranker["ray_actor_options"] == {"num_cpus": 1, "resources": {"models": 1}}
    # Keys the profile does not name keep serve_config.yaml's values (Helm merges maps).
    assert (
        ranker["autoscaling_config"]["upscale_delay_s"]
        == (source["Ranker"]["autoscaling_config"]["upscale_delay_s"])
    )
    assert ranker["max_queued_requests"] == source["Ranker"]["max_queued_requests"]


@pytest.mark.parametrize("profile", chart.PROFILES)
def test_serve_config_is_valid_for_ray_serve(helm: Path, profile: str) -> None:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    config = chart.serve_config(chart.render_profile(profile))
    schema = ServeDeploySchema.model_validate(config)
    assert [a.import_path for a in schema.applications] == ["serve_app.app:build_app"]
    for deployment in config["applications"][0]["deployments"]:
        if "autoscaling_config" in deployment:
            AutoscalingConfig(**deployment["autoscaling_config"])


# Every preset and a custom cut: the chart must name the deployments serve_app/placement.py names and
# give each the options serve_config() gives it (serve_config.yaml's, a custom group its first stage's).
PLACEMENTS: list[Any] = [
    "split",
    "two-tier",
    "fused",
    [["user_tower", "retriever", "ranker"], ["reranker"]],
    [["user_tower"], ["retriever", "ranker", "reranker"]],
    [["user_tower", "retriever", "ranker", "reranker"]],
]


@pytest.mark.parametrize("placement", PLACEMENTS, ids=json.dumps)
def test_serve_placement_renders_the_deployments_the_app_builds(helm: Path, placement: Any) -> None:
    from ray.serve.schema import ServeDeploySchema

    from serve_app.config import serve_config
    from serve_app.placement import resolve_placement

    rendered = chart.serve_config(chart.render(set_json={"serve.placement": placement}))
    ServeDeploySchema.model_validate(rendered)
    expected = serve_config({}, placement=placement)
    by_name = deployments_by_name(rendered)
    stages = [g.name for g in resolve_placement(placement) if not g.in_ingress]
    # Independent of serve_config(): the Ingress, the placement's groups in chain order, the EventWriter.
    assert [d["name"] for d in rendered["applications"][0]["deployments"]] == [
        "Ingress",
        *stages,
        "EventWriter",
    ]
    assert by_name == deployments_by_name(expected)
    (app,) = rendered["applications"]
    assert app["args"]["settings"]["placement"] == placement


def test_fused_placement_renders_no_stage_deployment(helm: Path) -> None:
    rendered = chart.serve_config(chart.render(set_json={"serve.placement": "fused"}))
    assert set(deployments_by_name(rendered)) == {"Ingress", "EventWriter"}


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ("sharded", "unknown preset"),
        ([["retriever", "user_tower"], ["ranker", "reranker"]], "consecutive stages"),
        ([["user_tower", "retriever"], ["ranker"]], "consecutive stages"),
        ([["user_tower", "retriever"], ["retriever", "ranker", "reranker"]], "consecutive stages"),
    ],
)
def test_a_bad_placement_is_refused_naming_the_value(
    helm: Path, placement: Any, message: str
) -> None:
    with pytest.raises(chart.HelmError, match=r"serve[./]placement") as refused:
        chart.render(set_json={"serve.placement": placement})
    if isinstance(placement, list):  # the schema passes it; the template's check names the rule
        assert message in str(refused.value)


def test_args_settings_keep_their_keys_beside_the_placement(helm: Path) -> None:
    rendered = chart.serve_config(
        chart.render(
            set_json={
                "serve.placement": "two-tier",
                "serve.args": {"settings": {"deadlines": {"ranker": 0.5}}},
            }
        )
    )
    (app,) = rendered["applications"]
    assert app["args"]["settings"] == {"deadlines": {"ranker": 0.5}, "placement": "two-tier"}


def test_ray_serve_schema_refuses_a_broken_deployment(helm: Path) -> None:
    # The check above can fail: num_replicas next to autoscaling_config is refused by Ray itself.
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(chart.serve_config(chart.render_profile("default")))
    config["applications"][0]["deployments"][0]["num_replicas"] = 3
    with pytest.raises(ValueError, match="num_replicas"):
        ServeDeploySchema.model_validate(config)


_IMPORT_CHECK = """
import importlib, inspect, json, sys
module, attr = sys.argv[1].split(":")
builder = getattr(importlib.import_module(module), attr)
(param,) = inspect.signature(builder).parameters.values()
results = {}
for profile, args in json.loads(sys.stdin.read()).items():
    param.annotation.model_validate(args)
    results[profile] = "ok"
print(json.dumps({"builder": builder.__name__, "args_model": param.annotation.__name__, **results}))
"""


@pytest.mark.slow
def test_import_path_imports_and_every_profiles_args_fit_the_builder(helm: Path) -> None:
    # A subprocess: the graph imports Ray, torch and Feast (~10 s), which the other tests do not need.
    import_path = chart.serve_config(chart.render_profile("default"))["applications"][0][
        "import_path"
    ]
    args = {
        p: chart.serve_config(chart.render_profile(p))["applications"][0].get("args", {})
        for p in chart.PROFILES
    }
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK, import_path],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        cwd=chart.REPO,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"builder": "build_app", "args_model": "AppArgs"} | dict.fromkeys(
        chart.PROFILES, "ok"
    )


# --- the RayService object -----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", chart.PROFILES)
def test_rayservice_validates_against_the_kuberay_crds(
    helm: Path, crds: Path, profile: str
) -> None:
    rayservice = chart.one(chart.render_profile(profile), "RayService")
    chart.crd_validator("ray.io_rayservices.yaml").validate(rayservice)
    # The RayCluster KubeRay creates from rayClusterConfig must satisfy the RayCluster CRD too.
    chart.crd_validator("ray.io_rayclusters.yaml", "spec").validate(
        rayservice["spec"]["rayClusterConfig"]
    )


def test_crd_validation_refuses_unknown_fields_and_wrong_types(helm: Path, crds: Path) -> None:
    validator = chart.crd_validator("ray.io_rayservices.yaml")
    rayservice = copy.deepcopy(chart.one(chart.render_profile("default"), "RayService"))
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        validator.validate(rayservice)
    rayservice = copy.deepcopy(chart.one(chart.render_profile("default"), "RayService"))
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'integer'"):
        validator.validate(rayservice)


def test_ray_version_is_the_python_dependency_and_every_ray_pod_runs_the_chart_image(
    helm: Path,
) -> None:
    import ray

    docs = chart.render_profile("default")
    rayservice = chart.one(docs, "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    images = {
        c["image"]
        for where, spec, _ in chart.pod_templates(docs)
        if where.startswith("ray-")
        for c in spec["containers"]
    }
    assert images == {"recserve/recserve:0.1.0"}


def test_image_digest_pins_every_recserve_container(helm: Path) -> None:
    digest = "sha256:" + "ab" * 32
    docs = chart.render(set_json={"image.digest": digest})
    images = {
        c["image"]
        for _, spec, _ in chart.pod_templates(docs)
        for c in spec["containers"]
        if c["name"] != "redis"
    }
    assert images == {f"recserve/recserve@{digest}"}


@pytest.mark.parametrize("profile", chart.PROFILES)
def test_head_and_worker_groups_have_requests_and_limits(helm: Path, profile: str) -> None:
    values = chart.profile_values(profile)["rayService"]
    cluster = chart.one(chart.render_profile(profile), "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["resources"] == values["head"]["resources"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert list(groups) == [g["name"] for g in values["workerGroups"]]
    for group in values["workerGroups"]:
        rendered = groups[group["name"]]
        assert rendered["template"]["spec"]["containers"][0]["resources"] == group["resources"]
        assert (rendered["minReplicas"], rendered["replicas"], rendered["maxReplicas"]) == (
            group["minReplicas"],
            group["replicas"],
            group["maxReplicas"],
        )
        for kind in ("requests", "limits"):
            assert set(group["resources"][kind]) >= {"cpu", "memory"}


def test_in_tree_autoscaling_and_zero_downtime_upgrades_by_default(helm: Path) -> None:
    spec = chart.one(chart.render_profile("default"), "RayService")["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 120
    assert cluster["autoscalerOptions"]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # NewCluster: a changed cluster spec rolls out as a new RayCluster that takes traffic when healthy.
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    # Replicas stay off the head, so the head is left out of the serve Service.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["excludeHeadPodFromServeSvc"] is True


def test_minimal_profile_turns_the_autoscaler_and_the_heads_token_off(helm: Path) -> None:
    cluster = chart.one(chart.render_profile("minimal"), "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is False
    assert "autoscalerOptions" not in cluster
    assert cluster["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_serve_service_is_the_one_the_ingress_routes_to(helm: Path) -> None:
    docs = chart.render_profile("production")
    service = chart.one(docs, "RayService")["spec"]["serveService"]
    assert service["metadata"]["name"] == "recserve-serve"
    assert service["spec"]["ports"] == [
        {"name": "serve", "port": 8000, "targetPort": 8000, "protocol": "TCP"}
    ]
    backends = [
        p["backend"]["service"]
        for rule in chart.one(docs, "Ingress")["spec"]["rules"]
        for p in rule["http"]["paths"]
    ]
    assert backends == [{"name": "recserve-serve", "port": {"name": "serve"}}] * 2


# --- the environment the serving and job pods get, read by the app's own settings ----------------------

_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def resolved_env(container: dict[str, Any], secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: secretKeyRef values from `secrets`
    (optional refs to missing Secrets are left out), $(VAR) expanded from earlier entries."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = _REF.sub(lambda m: env.get(m[1], m[0]), entry["value"])
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        key = (ref["name"], ref["key"])
        if key in secrets:
            env[entry["name"]] = secrets[key]
        else:
            assert ref.get("optional"), f"{entry['name']}: Secret {key} missing and not optional"
    return env


SECRETS = {
    ("recserve-feast", "registry-url"): "postgresql+psycopg://feast:pw@pg:5432/feast",
    ("recserve-redis", "redis-url"): "redis://:pw@redis.example:6379/0",
    ("recserve-api-key", "api-key"): "k3y",
    ("recserve-redis-auth", "redis-password"): "s3cret",
    ("redis-auth", "redis-password"): "0ther",
    ("recserve-mlflow-auth", "username"): "admin",
    ("recserve-mlflow-auth", "password"): "ml-pw",
}
# The API-key, rate-limit and explain settings of issue #29 (serve_app/config.py ApiConfig, from the
# API-key branch). Until ServeSettings has them, settings are built without these variables and the test
# that checks them skips; once it has them, every variable the chart sets is read.
AUTH_ENV = ("RECSERVE_API__AUTH__", "RECSERVE_API__RATE_LIMIT__", "RECSERVE_API__EXPLAIN_ENABLED")


def has_auth_settings() -> bool:
    from serve_app.config import ApiConfig

    return {"auth", "rate_limit", "explain_enabled"} <= set(ApiConfig.model_fields)


def _ray_head_container(docs: tuple[chart.Doc, ...] | list[chart.Doc]) -> dict[str, Any]:
    cluster = chart.one(docs, "RayService")["spec"]["rayClusterConfig"]
    container: dict[str, Any] = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    return container


def serve_settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from serve_app.config import ServeSettings

    for name, value in env.items():
        if name.startswith(AUTH_ENV) and not has_auth_settings():
            continue
        monkeypatch.setenv(name, value)
    return ServeSettings()


def test_serving_settings_built_from_the_default_pod_environment(
    helm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = resolved_env(_ray_head_container(chart.render_profile("default")), SECRETS)
    settings = serve_settings_from(env, monkeypatch)
    assert settings.event_redis_url == "redis://recserve:s3cret@recserve-redis:6379/0"
    assert settings.tracking_uri == "http://recserve-mlflow:5000"
    assert settings.models.uri == "models:/recserve@champion"
    assert settings.api.admin_api_key.get_secret_value() == "k3y"
    assert settings.feature_store.resolved_profile == "cluster"
    assert settings.feature_store.registry_url == SECRETS[("recserve-feast", "registry-url")]
    assert settings.feature_store.redis_url == "redis://recserve:s3cret@recserve-redis:6379/0"
    assert settings.demo.enabled is False
    # MLflow's client reads its credentials from the environment (the mlflow-auth Secret).
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("admin", "ml-pw")
    # Bundle cache and Feast files on the writable /tmp emptyDir (the root filesystem is read-only).
    assert str(settings.bundle_cache_dir).startswith("/tmp/")


def test_serving_settings_with_an_external_redis_and_without_the_api_key_secret(
    helm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = chart.render_profile("production")
    env = resolved_env(_ray_head_container(docs), SECRETS)
    assert env["REDIS_URL"] == SECRETS[("recserve-redis", "redis-url")]
    settings = serve_settings_from(env, monkeypatch)
    assert settings.event_redis_url == "redis://:pw@redis.example:6379/0"
    assert settings.api.admin_api_key.get_secret_value() == "k3y"
    # Without the optional API key Secret the variable is simply absent: admin routes stay closed.
    no_key = {k: v for k, v in SECRETS.items() if k[0] != "recserve-api-key"}
    env = resolved_env(_ray_head_container(chart.render_profile("default")), no_key)
    assert "RECSERVE_API__ADMIN_API_KEY" not in env


def test_bundled_redis_password_reaches_the_url_through_the_kubelets_expansion(
    helm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = chart.render(set_json={"redis.auth.existingSecret": "redis-auth"})
    env = resolved_env(_ray_head_container(docs), SECRETS)
    assert env["REDIS_URL"] == "redis://recserve:0ther@recserve-redis:6379/0"
    settings = serve_settings_from(env, monkeypatch)
    assert settings.event_redis_url == env["REDIS_URL"]
    # Feast gets the same ACL user (its connection string, parsed by Feast itself).
    from feast.infra.online_stores.redis import RedisOnlineStore

    from feature_repo.store import repo_config

    online = repo_config(settings.feature_store).online_store
    _, params = RedisOnlineStore._parse_connection_string(online.connection_string)
    assert (params["username"], params["password"]) == ("recserve", "0ther")


def test_api_key_settings_built_from_the_pod_environment(
    helm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not has_auth_settings():
        pytest.skip("ServeSettings has no api.auth / rate_limit / explain_enabled yet (#29)")
    env = resolved_env(_ray_head_container(chart.render_profile("default")), SECRETS)
    api = serve_settings_from(env, monkeypatch).api
    assert api.auth.enabled is True
    assert str(api.auth.keys_file) == "/etc/recserve/api-keys/keys.json"
    assert (api.rate_limit.requests_per_second, api.rate_limit.burst) == (100, 200)
    assert api.explain_enabled is False


def test_every_ray_container_gets_the_same_environment(helm: Path) -> None:
    docs = chart.render_profile("production")
    envs = [
        json.dumps(spec["containers"][0]["env"], sort_keys=True)
        for where, spec, _ in chart.pod_templates(docs)
        if where.startswith("ray-")
    ]
    assert len(envs) == 3 and len(set(envs)) == 1


@pytest.mark.parametrize("profile", chart.PROFILES)
def test_ray_pods_run_the_ray_environment_the_benchmarks_measure(helm: Path, profile: str) -> None:
    from serve_app.cli import RAY_ENV

    env = resolved_env(_ray_head_container(chart.render_profile(profile)), SECRETS)
    assert {k: env.get(k) for k in RAY_ENV} == RAY_ENV
    # A user's value wins: rayService.rayEnv is a map, merged by Helm.
    docs = chart.render(set_json={"rayService.rayEnv": {"RAY_SERVE_ENABLE_HA_PROXY": "0"}})
    assert resolved_env(_ray_head_container(docs), SECRETS)["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


EXPERIMENT = {
    "name": "ranker-v2",
    "salt": "exp-2026-11",
    "variants": [
        {"name": "control", "model": "champion", "weight": 0.9},
        {"name": "treatment", "model": "challenger", "weight": 0.1},
    ],
    "shadow": {"model": "7", "share": 0.05},
}


def test_the_experiment_values_reach_the_serving_settings(
    helm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "RECSERVE_EXPERIMENT" not in resolved_env(
        _ray_head_container(chart.render_profile("default")), SECRETS
    )
    docs = chart.render(set_json={"experiment": EXPERIMENT})
    env = resolved_env(_ray_head_container(docs), SECRETS)
    experiment = serve_settings_from(env, monkeypatch).experiment
    assert experiment.weights == (("control", 0.9), ("treatment", 0.1))
    assert (experiment.name, experiment.salt) == ("ranker-v2", "exp-2026-11")
    assert (experiment.shadow.model, experiment.shadow.share) == ("7", 0.05)


@pytest.mark.parametrize(
    "bad",
    [
        {"variants": [{"name": "a b"}]},
        {"variants": [{"model": "champion"}]},
        {"shadow": {"share": 2}},
        {"salt": 3},
        {"colour": "blue"},
    ],
)
def test_the_schema_refuses_a_malformed_experiment(helm: Path, bad: dict[str, Any]) -> None:
    with pytest.raises(chart.HelmError, match="experiment"):
        chart.render(set_json={"experiment": bad})
