"""templates/redis-statefulset.yaml, redis-service.yaml: the bundled Redis (AOF on, PVC) or an external
URL from a Secret. The rendered redis-server arguments are run by a real redis-server here."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helm import chart
from tests.helm.redis_server import RenderedRedis


def redis_container(docs: tuple[chart.Doc, ...] | list[chart.Doc]) -> dict[str, Any]:
    container: dict[str, Any] = chart.one(docs, "StatefulSet")["spec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_bundled_redis_runs_with_aof_on_a_pvc(helm: Path) -> None:
    docs = chart.render_profile("default")
    statefulset = chart.one(docs, "StatefulSet")
    container = redis_container(docs)
    args = container["args"]
    assert container["command"] == ["redis-server"]
    assert option(args, "--appendonly") == "yes"
    assert option(args, "--appendfsync") == "everysec"
    assert option(args, "--dir") == "/data"
    assert option(args, "--maxmemory-policy") == "noeviction"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert statefulset["spec"]["serviceName"] == "recserve-redis-headless"


def test_redis_services_select_the_redis_pod(helm: Path) -> None:
    docs = chart.render_profile("default")
    pod_labels = chart.one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    services = {
        s["metadata"]["name"]: s
        for s in chart.of_kind(docs, "Service")
        if "redis" in s["metadata"]["name"]
    }
    assert set(services) == {"recserve-redis", "recserve-redis-headless"}
    assert services["recserve-redis-headless"]["spec"]["clusterIP"] == "None"
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert service["spec"]["ports"] == [{"name": "redis", "port": 6379, "targetPort": "redis"}]


def test_external_redis_url_comes_from_a_secret_and_nothing_is_bundled(helm: Path) -> None:
    docs = chart.render_profile("production")
    assert chart.of_kind(docs, "StatefulSet") == []
    assert not [s for s in chart.of_kind(docs, "Service") if "redis" in s["metadata"]["name"]]
    for where, spec, _ in chart.pod_templates(docs):
        if where == "Deployment/recserve-mlflow":
            continue
        env = chart.container_env(spec["containers"][0])
        assert env["REDIS_URL"] == {
            "name": "REDIS_URL",
            "valueFrom": {"secretKeyRef": {"name": "recserve-redis", "key": "redis-url"}},
        }, where


def test_redis_auth_with_an_external_redis_is_refused_with_a_reason(helm: Path) -> None:
    with pytest.raises(chart.HelmError, match=r"redis.auth.existingSecret applies to the bundled"):
        chart.render(set_json={"redis.enabled": False, "redis.auth.existingSecret": "x"})


# --- sizing from the expected users and items ------------------------------------------------------


def sized_mib(users: float, items: float) -> tuple[int, int]:
    """(maxmemory, memory limit) in MiB from values.yaml's per-million figures, by hand."""
    sizing = chart.profile_values("default")["redis"]["sizing"]
    maxmemory = math.ceil(
        sizing["baseMiB"]
        + users * sizing["mibPerMillionUsers"]
        + items * sizing["mibPerMillionItems"]
    )
    return maxmemory, math.ceil(maxmemory * sizing["memoryOverhead"])


def test_unsized_redis_keeps_the_written_maxmemory_and_resources(helm: Path) -> None:
    values = chart.profile_values("default")["redis"]
    assert values["sizing"]["expectedUsersMillions"] == 0
    container = redis_container(chart.render_profile("default"))
    assert option(container["args"], "--maxmemory") == values["maxmemory"]
    assert container["resources"] == values["resources"]


@pytest.mark.parametrize(("users", "items"), [(1, 1), (2.5, 0.1), (0.2, 0)])
def test_sized_redis_follows_the_expected_users_and_items(
    helm: Path, users: float, items: float
) -> None:
    container = redis_container(
        chart.render(
            set_json={
                "redis.sizing.expectedUsersMillions": users,
                "redis.sizing.expectedItemsMillions": items,
            }
        )
    )
    maxmemory, limit = sized_mib(users, items)
    assert option(container["args"], "--maxmemory") == f"{maxmemory}mb"
    assert option(container["args"], "--maxmemory-policy") == "noeviction"
    resources = container["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == f"{limit}Mi"
    # Only memory follows the sizing; the CPU stays as written.
    written = chart.profile_values("default")["redis"]["resources"]
    assert resources["requests"]["cpu"] == written["requests"]["cpu"]
    assert resources["limits"]["cpu"] == written["limits"]["cpu"]
    # The limit leaves room above maxmemory (fragmentation, the AOF rewrite's fork).
    assert limit > maxmemory


def test_negative_expected_users_are_refused(helm: Path) -> None:
    with pytest.raises(chart.HelmError, match=r"expectedUsersMillions"):
        chart.render(set_json={"redis.sizing.expectedUsersMillions": -1})


# --- the rendered arguments, run by a real redis-server -------------------------------------------------

# What the kubelet would take from the redis-auth Secret.
PASSWORDS = {"REDIS_PASSWORD": "Recserve0Password1", "REDIS_ADMIN_PASSWORD": "Admin0Password1"}


@pytest.fixture
def rendered_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RenderedRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    values = {"redis.image.tag": local_redis_version(), **request.param}
    server = RenderedRedis(
        redis_container(chart.render(set_json=values))["args"], tmp_path, PASSWORDS
    )
    yield server
    server.stop()


def local_redis_version() -> str:
    """The installed redis-server's version, as the image tag the rendered arguments are for."""
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True)
    match = re.search(r"v=(\d+\.\d+\.\d+)", out.stdout)
    assert match, out.stdout
    return match[1]


def as_recserve(server: RenderedRedis) -> redis.Redis:
    return server.start("recserve", PASSWORDS["REDIS_PASSWORD"])


@pytest.mark.parametrize("rendered_redis", [{}], indirect=True)
def test_rendered_redis_keeps_acknowledged_writes_across_a_restart(
    helm: Path, rendered_redis: RenderedRedis, tmp_path: Path
) -> None:
    client = as_recserve(rendered_redis)
    admin = redis.Redis(
        port=rendered_redis.port, username="admin", password=PASSWORDS["REDIS_ADMIN_PASSWORD"]
    )
    assert admin.config_get("appendonly") == {"appendonly": "yes"}
    assert admin.config_get("save") == {"save": ""}
    admin.close()
    client.xadd("recserve:events", {"user_id": "u1", "item_id": "i1"})
    client.set("k", "v")
    client.close()
    rendered_redis.stop()  # SIGTERM, as the kubelet sends: the AOF is flushed
    assert list(tmp_path.glob("appendonlydir/*.aof")), "no append-only file written"
    client = as_recserve(rendered_redis)
    assert client.get("k") == b"v"
    assert client.xlen("recserve:events") == 1
    client.close()


@pytest.mark.parametrize(
    "rendered_redis",
    [{"redis.sizing.expectedUsersMillions": 1, "redis.sizing.expectedItemsMillions": 1}],
    indirect=True,
)
def test_rendered_sized_maxmemory_is_what_redis_runs_with(
    helm: Path, rendered_redis: RenderedRedis
) -> None:
    client = rendered_redis.start("admin", PASSWORDS["REDIS_ADMIN_PASSWORD"])  # CONFIG is admin's
    maxmemory, _ = sized_mib(1, 1)
    assert client.config_get("maxmemory") == {"maxmemory": str(maxmemory * 2**20)}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    client.close()
