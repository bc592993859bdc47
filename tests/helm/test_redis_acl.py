"""The bundled Redis is locked: always a password, protected mode, the `default` user off, and an ACL user
limited to the commands recserve runs. The rendered arguments run in a real redis-server and the real code
paths (Feast write and read, the event stream and its exporter, the experiment log, the online gate, the
readiness probe) go through the ACL user with the pods' REDIS_URL; Redis's ACL LOG must then be empty, and a
command outside the list is refused."""

from __future__ import annotations

import base64
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.helm import chart
from tests.helm.redis_server import RenderedRedis, expand
from tests.helm.test_redis import local_redis_version, redis_container

# Generated as the chart generates them (letters and digits), so the kubelet-expanded URL is valid.
SECRET = {"REDIS_PASSWORD": "Q7wz0RrecservePw4xT", "REDIS_ADMIN_PASSWORD": "K2adminPw9vLm"}
FORBIDDEN = [
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("KEYS", "*"),
    ("CONFIG", "GET", "*"),
    ("CONFIG", "SET", "appendonly", "no"),
    ("ACL", "LIST"),
    ("CLIENT", "LIST"),
    ("SHUTDOWN", "NOSAVE"),
    ("SCRIPT", "FLUSH"),
    ("PUBLISH", "c", "m"),
    ("REPLICAOF", "NO", "ONE"),
    ("MODULE", "LIST"),
    ("SWAPDB", "0", "1"),
    ("XGROUP", "DESTROY", "recserve:events", "exporter"),
]


def pod_env(docs: list[chart.Doc], where: str) -> dict[str, dict[str, Any]]:
    spec = next(s for w, s, _ in chart.pod_templates(docs) if w == where)
    return chart.container_env(spec["containers"][0])


# --- what the chart renders -----------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["default", "minimal"])
def test_bundled_redis_always_runs_locked(helm: Path, profile: str) -> None:
    docs = list(chart.render_profile(profile))
    args = redis_container(docs)["args"]
    joined = " ".join(args)
    assert args[args.index("--protected-mode") + 1] == "yes"
    assert "--requirepass" not in args
    # `default` is reset: off, no password, no commands, no keys. Anonymous access is gone.
    assert "--user default reset --user" in joined
    assert "--user recserve reset on >$(REDIS_PASSWORD) ~* +ping" in joined
    assert "--user admin reset on >$(REDIS_ADMIN_PASSWORD) ~* &* +@all" in joined
    recserve = joined.split("--user recserve ", 1)[1].split(" --user", 1)[0].split()
    assert "+@all" not in recserve and not any(r.startswith("&") for r in recserve)
    env = chart.container_env(redis_container(docs))
    for name, key in (
        ("REDIS_PASSWORD", "redis-password"),
        ("REDIS_ADMIN_PASSWORD", "admin-password"),
    ):
        assert env[name]["valueFrom"] == {
            "secretKeyRef": {"name": "recserve-redis-auth", "key": key}
        }
    # Every recserve pod connects as the ACL user with the password from the same Secret.
    for where in {w for w, _, _ in chart.pod_templates(docs)} - {
        "StatefulSet/recserve-redis",
        "Deployment/recserve-mlflow",
    }:
        env = pod_env(docs, where)
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "recserve-redis-auth",
            "key": "redis-password",
        }, where
        assert (
            env["REDIS_URL"]["value"] == "redis://recserve:$(REDIS_PASSWORD)@recserve-redis:6379/0"
        )
        # Dependent variables expand only from entries defined before them.
        names = list(env)
        assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL"), where


def test_the_generated_passwords_are_kept_and_url_safe(helm: Path) -> None:
    secret = chart.one(chart.render_profile("default"), "Secret", "recserve-redis-auth")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(values) == {"redis-password", "admin-password"}
    for value in values.values():
        assert re.fullmatch(r"[A-Za-z0-9]{40}", value)
    assert values["redis-password"] != values["admin-password"]
    # Rendered again (a new install), new passwords: nothing is baked into the chart.
    again = chart.one(chart.render(), "Secret", "recserve-redis-auth")
    assert again["data"] != secret["data"]


def test_an_existing_secret_replaces_the_generated_one(helm: Path) -> None:
    docs = chart.render(
        set_json={
            "redis.auth.existingSecret": "ops-redis",
            "redis.auth.secretKey": "app",
            "redis.auth.adminSecretKey": "root",
            "redis.auth.username": "recs",
        }
    )
    assert not [d for d in chart.of_kind(docs, "Secret") if "redis" in d["metadata"]["name"]]
    env = chart.container_env(redis_container(docs))
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "ops-redis", "key": "app"}
    assert env["REDIS_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "ops-redis",
        "key": "root",
    }
    assert "--user recs reset on" in " ".join(redis_container(docs)["args"])
    head = pod_env(docs, "ray-head")
    assert head["REDIS_URL"]["value"] == "redis://recs:$(REDIS_PASSWORD)@recserve-redis:6379/0"
    assert head["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "ops-redis",
        "key": "app",
    }


def test_extra_commands_extend_the_acl_user(helm: Path) -> None:
    args = redis_container(chart.render(set_json={"redis.auth.extraCommands": ["+xdel"]}))["args"]
    recserve = " ".join(args).split("--user recserve ", 1)[1].split(" --user", 1)[0].split()
    assert recserve[-1] == "+xdel"


# --- the rendered arguments in a real redis-server, the real code through them ---------------------


@pytest.fixture
def locked(helm: Path, tmp_path: Path) -> Iterator[tuple[RenderedRedis, list[chart.Doc]]]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    # The arguments rendered for the Redis version that runs here.
    docs = chart.render(set_json={"redis.image.tag": local_redis_version()})
    server = RenderedRedis(
        redis_container(docs)["args"], tmp_path / "redis", SECRET, bind="0.0.0.0"
    )
    (tmp_path / "redis").mkdir()
    server.start().close()
    yield server, docs
    server.stop()


def admin_of(server: RenderedRedis) -> redis.Redis:
    return redis.Redis(port=server.port, username="admin", password=SECRET["REDIS_ADMIN_PASSWORD"])


def pod_redis_url(docs: list[chart.Doc], server: RenderedRedis) -> dict[str, str]:
    """REDIS_URL and the Feast URL of the Ray head as the kubelet expands them, the Service name
    pointed at the local server."""
    env: dict[str, str] = dict(SECRET)
    for name, entry in pod_env(docs, "ray-head").items():
        if "value" in entry:
            env[name] = expand(entry["value"], env)
    local = f"127.0.0.1:{server.port}"
    return {
        k: env[k].replace("recserve-redis:6379", local)
        for k in ("REDIS_URL", "RECSERVE_FEATURE_STORE__REDIS_URL")
    }


def write_profiles(data_dir: Path, stamp: pd.Timestamp) -> None:
    """Two users and two items, values chosen by hand (the batch views' Parquet sources)."""
    features = data_dir / "features"
    features.mkdir(parents=True)
    pd.DataFrame(
        {
            "user_id": ["u1", "u2"],
            "event_timestamp": stamp,
            "event_count": np.array([3.0, 1.0], np.float32),
            "category_prefs": [np.array([0.4, 0.6], np.float32), np.array([0.0, 1.0], np.float32)],
            "base_embedding": [np.array([1, 2, 3, 4], np.float32), np.zeros(4, np.float32)],
            "recent_items": [["i1", "i2"], ["i2"]],
            "seen_items": [["i1", "i2"], ["i2"]],
        }
    ).to_parquet(features / "user_profile.parquet", index=False)
    pd.DataFrame(
        {
            "item_id": ["i1", "i2"],
            "event_timestamp": stamp,
            "category": ["c0", "c1"],
            "price": [9.5, 3.0],
            **{
                name: np.array([0.5, 0.25], np.float32)
                for name in ("log_pop_all", "log_pop_7d", "log_pop_1d", "ctr", "age_days")
            },
            "log_price": np.log1p(np.array([9.5, 3.0])).astype(np.float32),
        }
    ).to_parquet(features / "item_profile.parquet", index=False)


def test_recserve_runs_through_the_acl_user_and_redis_denies_it_nothing(
    locked: tuple[RenderedRedis, list[chart.Doc]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from feature_repo.store import apply, build_store, materialize_incremental
    from serve_app.config import ServeSettings
    from serve_app.events import EventLogWriter, ItemEmbeddings
    from serve_app.experiments import ExperimentLog, Served, ShadowComparison
    from serve_app.features import FeatureShapes, OnlineFeatureReader
    from serve_app.redis_client import connect_redis
    from serve_app.schemas import Event
    from training.config import OnlineGateConfig
    from training.exporter import ExporterConfig, StreamExporter
    from training.online_gate import read_online_evidence

    server, docs = locked
    urls = pod_redis_url(docs, server)
    assert urls["REDIS_URL"].startswith("redis://recserve:")
    for name, value in urls.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RECSERVE_FEATURE_STORE__PROFILE", "redis")  # no PostgreSQL registry here
    monkeypatch.setenv("RECSERVE_FEATURE_STORE__DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RECSERVE_FEATURE_STORE__PROJECT", f"t{uuid.uuid4().hex[:10]}")
    settings = ServeSettings()
    url = settings.event_redis_url
    assert url == urls["REDIS_URL"]

    # Feast: apply, materialize (HSET, EXPIRE, HMGET), and read back through the serving reader.
    stamp = pd.Timestamp("2026-02-01", tz="UTC")
    write_profiles(tmp_path, stamp)
    apply(settings.feature_store)
    materialize_incremental(settings.feature_store, end=stamp + timedelta(hours=1))

    # Events: the writer's script (SET NX EX, XADD, HGET/HSET/HINCRBY, EXPIRE) through a pipeline.
    writer = EventLogWriter.from_settings(settings)
    emb = ItemEmbeddings("v1", {"i9": 0, "i2": 1}, np.eye(2, 4, dtype=np.float32))
    now = datetime.now(UTC)
    events = [
        Event(user_id="u1", item_id="i9", event_type="click", timestamp=now),
        Event(user_id="u1", item_id="i2", event_type="click", timestamp=now),
        Event(user_id="u2", item_id="i1", event_type="view", timestamp=now),
    ]
    written = writer.write(events, emb)
    assert written.applied == (True, True, True)
    writer.ping()

    reader = OnlineFeatureReader(
        build_store(settings.feature_store),
        connect_redis(url, 0.5),
        key_prefix=settings.realtime.key_prefix,
        store_on_redis=True,
    )
    shapes = FeatureShapes(n_categories=2, embedding_dim=4, history_length=3)
    got = reader.users(["u1", "nobody"], shapes, model_version="v1", now=now.timestamp())
    assert got.degraded is False
    assert got.event_count.tolist() == [3.0, 0.0]  # Feast, from the Parquet above
    assert got.recent_items[0] == ("i9", "i1", "i2")  # i9 new in front; i2 keeps its place
    # EMA rate 0.1 per click: 0.9 * (0.1 * e_i9) + 0.1 * e_i2
    np.testing.assert_allclose(got.delta_embedding[0], [0.09, 0.1, 0.0, 0.0], rtol=1e-6)

    # The exporter: group, XREADGROUP, XAUTOCLAIM, XACK, XINFO, XPENDING, XTRIM.
    out = tmp_path / "events_log"
    exporter = StreamExporter(
        redis.Redis.from_url(url), ExporterConfig(redis_url=url, out_dir=out, block_ms=0)
    )
    stats = exporter.drain()
    assert stats.written == 3
    exported = [
        i
        for p in sorted(out.glob("date=*/part-*.parquet"))
        for i in pq.read_table(p, columns=["event_id"]).column(0).to_pylist()
    ]
    assert sorted(exported) == sorted(written.event_ids)
    backlog = writer.stream_stats()  # TIME, EXISTS, XINFO GROUPS, XPENDING, XRANGE, XLEN
    assert [(g.name, g.pending) for g in backlog.groups] == [("exporter", 0)]

    # The experiment log (the router) and the online gate (training) read the same counts.
    log = ExperimentLog(connect_redis(url, 0.5), "recserve:exp", "default", 60.0, 100)
    log.served([Served("r1", "u1", "champion", "1"), Served("r2", "u2", "challenger", "2")])
    assert log.attribute([("r1", "u1", "click"), (None, "u2", "click")]) == [
        "champion",
        "challenger",
    ]
    comparison = ShadowComparison("r1", "champion", "1", "2", 10, 12.0, 14.0, 1.0, 1.0)
    log.log_shadow([comparison])
    assert log.shadow_log() == [comparison]
    evidence = read_online_evidence(url, OnlineGateConfig())
    assert evidence.control_counts is not None and evidence.control_counts.impressions == 1
    assert evidence.treatment_counts is not None and evidence.treatment_counts.impressions == 1

    # feast teardown (SCAN, DEL) of the project's rows.
    build_store(settings.feature_store).teardown()

    admin = admin_of(server)
    # The code connected as the ACL user, never as admin or default...
    users = {c["user"] for c in admin.client_list() if c.get("user") != "admin"}
    assert users == {"recserve"}
    # ...and Redis refused it nothing (the ACL LOG records every denied command, in scripts too).
    assert admin.acl_log() == []
    admin.close()


def test_commands_outside_the_list_are_refused(
    locked: tuple[RenderedRedis, list[chart.Doc]],
) -> None:
    server, docs = locked
    url = pod_redis_url(docs, server)["REDIS_URL"]
    client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
    assert client.ping()
    for command in FORBIDDEN:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    # Inside a script too: each redis.call is checked against the user's ACL.
    with pytest.raises(redis.exceptions.ResponseError, match=r"can't run this command"):
        client.eval("return redis.call('FLUSHALL')", 0)
    client.close()
    admin = admin_of(server)
    denied = {entry["object"] for entry in admin.acl_log(count=100)}
    assert {"flushall", "keys", "config|get", "acl|list"} <= denied
    # The admin user (operators only; no pod gets its password) may.
    assert admin.config_get("protected-mode") == {"protected-mode": "yes"}
    admin.close()


def test_anonymous_and_default_user_connections_are_refused(
    locked: tuple[RenderedRedis, list[chart.Doc]],
) -> None:
    server, _ = locked
    anonymous = redis.Redis(port=server.port, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.get("k")
    anonymous.close()
    for password in ("", SECRET["REDIS_PASSWORD"], SECRET["REDIS_ADMIN_PASSWORD"]):
        as_default = redis.Redis(
            port=server.port, username="default", password=password, retry=Retry(NoBackoff(), 0)
        )
        with pytest.raises(redis.exceptions.AuthenticationError):
            as_default.ping()
        as_default.close()
    wrong = redis.Redis(port=server.port, username="recserve", password="guess")
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()
    wrong.close()


def non_loopback_address() -> str | None:
    """An IPv4 address of this host other than 127.0.0.0/8, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route's address
        except OSError:
            return None
        address = str(sock.getsockname()[0])
    return None if address.startswith("127.") else address


def test_protected_mode_admits_the_acl_user_from_another_address(
    locked: tuple[RenderedRedis, list[chart.Doc]],
) -> None:
    # Protected mode refuses non-loopback clients while `default` has no password; reset, it has
    # none to lack, so pods reach Redis with credentials and without them get NOAUTH, not DENIED.
    server, _ = locked
    address = non_loopback_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    client = redis.Redis(
        host=address, port=server.port, username="recserve", password=SECRET["REDIS_PASSWORD"]
    )
    assert client.ping()
    client.close()
    anonymous = redis.Redis(host=address, port=server.port, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    anonymous.close()


def test_the_readiness_probe_passes_as_the_acl_user(
    locked: tuple[RenderedRedis, list[chart.Doc]],
) -> None:
    server, docs = locked
    probe = redis_container(docs)["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["sh", "-c"]
    script = probe[2].replace("-h 127.0.0.1", f"-h 127.0.0.1 -p {server.port}")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "REDIS_PASSWORD": SECRET["REDIS_PASSWORD"]}
    assert subprocess.run(["sh", "-c", script], env=env, check=False).returncode == 0
    # The probe can fail: with a wrong password it does.
    env["REDIS_PASSWORD"] = "wrong"
    assert subprocess.run(["sh", "-c", script], env=env, check=False).returncode != 0


def test_the_exporters_dead_letter_transaction_is_allowed(
    locked: tuple[RenderedRedis, list[chart.Doc]],
) -> None:
    # The events branch of #29 moves an undecodable entry to a dead-letter stream and acknowledges it
    # in one MULTI/EXEC (a redis-py pipeline with transaction=True).
    server, docs = locked
    client = redis.Redis.from_url(pod_redis_url(docs, server)["REDIS_URL"])
    client.xgroup_create("recserve:events", "exporter", "0", mkstream=True)
    entry = client.xadd("recserve:events", {"bad": "\xff"})
    client.xreadgroup("exporter", "exporter-1", {"recserve:events": ">"})
    pipe = client.pipeline(transaction=True)
    pipe.xadd("recserve:events:dead", {"id": entry}, maxlen=1000, approximate=True)
    pipe.xack("recserve:events", "exporter", entry)
    assert pipe.execute()[1] == 1
    assert client.xlen("recserve:events:dead") == 1
    client.close()
    admin = admin_of(server)
    assert admin.acl_log() == []
    admin.close()
