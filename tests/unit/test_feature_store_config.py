"""Profiles are chosen by configuration: settings, environment and the YAML files agree."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from feast.repo_config import load_repo_config
from pydantic import ValidationError

from feature_repo.config import FeatureStoreConfig
from feature_repo.services import feature_refs, ranker_v1, user_tower_v1
from feature_repo.store import feast_connection_string, repo_config
from serve_app.config import DEFAULT_REDIS_URL, ServeSettings

REPO = Path(__file__).resolve().parents[2] / "feature_repo"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "RECSERVE_REDIS_URL", "RECSERVE_FEATURE_STORE__PROFILE"):
        monkeypatch.delenv(name, raising=False)


def test_default_is_embedded_sqlite_with_file_registry_under_the_data_dir(tmp_path: Path) -> None:
    settings = ServeSettings(feature_store={"data_dir": tmp_path})
    assert settings.feature_store.resolved_profile == "embedded"
    config = repo_config(settings.feature_store)
    assert config.online_store.type == "sqlite"
    assert config.online_store.path == str(tmp_path / "feast" / "online.db")
    assert config.registry.path == str(tmp_path / "feast" / "registry.db")
    assert config.repo_path == tmp_path.resolve()
    assert settings.event_redis_url == DEFAULT_REDIS_URL


def test_redis_url_env_selects_the_redis_profile_for_feast_and_the_event_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://10.0.0.5:6380/2")
    settings = ServeSettings()
    assert settings.feature_store.resolved_profile == "redis"
    assert settings.event_redis_url == "redis://10.0.0.5:6380/2"
    online = repo_config(settings.feature_store).online_store
    assert online.type == "redis"
    assert online.connection_string.startswith("10.0.0.5:6380,db=2,")


def test_nested_env_overrides_reach_each_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSERVE_REALTIME__EMA_RATE", "0.25")
    monkeypatch.setenv("RECSERVE_EVENT_LOG__STREAM_KEY", "other:events")
    monkeypatch.setenv("RECSERVE_FEATURE_STORE__PROJECT", "shop_b")
    settings = ServeSettings()
    assert settings.realtime.ema_rate == 0.25
    assert settings.event_log.stream_key == "other:events"
    assert settings.feature_store.project == "shop_b"


def test_cluster_profile_needs_a_registry_url_and_uses_the_sql_registry() -> None:
    with pytest.raises(ValidationError, match="registry_url"):
        FeatureStoreConfig(profile="cluster", redis_url="redis://r:6379/0")
    with pytest.raises(ValidationError, match="redis_url"):
        FeatureStoreConfig(profile="redis")
    config = FeatureStoreConfig(
        profile="cluster",
        redis_url="redis://r:6379/0",
        registry_url="postgresql+psycopg://feast@pg:5432/feast",
    )
    registry = repo_config(config).registry
    assert registry.registry_type == "sql"
    assert registry.path == "postgresql+psycopg://feast@pg:5432/feast"


def test_connection_string_carries_credentials_db_tls_and_timeouts() -> None:
    got = feast_connection_string("rediss://app:p%40ss@cache.internal:6390/3", 0.1)
    assert got == (
        "cache.internal:6390,db=3,username=app,password=p@ss,ssl=true,"
        "socket_timeout=0.1,socket_connect_timeout=0.1"
    )
    with pytest.raises(ValueError, match="redis://"):
        feast_connection_string("http://x", 0.1)


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("recserve", "Zk3q9LrT0aBcDeFgHiJkLmNoPqRsTuVwXyZ01234"),
        ("app", "123456"),
        ("a-b_c", "p@ss:w/rd"),
    ],
)
def test_feast_reads_back_the_acl_user_and_password_of_the_url(user: str, password: str) -> None:
    # Feast's own parser (the one its Redis client is built from) must see exactly the URL's
    # credentials; digits arrive as a number, which the client sends as the same text.
    from feast.infra.online_stores.redis import RedisOnlineStore

    url = f"redis://{quote(user)}:{quote(password, safe='')}@redis:6379/0"
    nodes, params = RedisOnlineStore._parse_connection_string(feast_connection_string(url, 0.1))
    assert nodes == [{"host": "redis", "port": "6379"}]
    assert (str(params["username"]), str(params["password"])) == (user, password)


@pytest.mark.parametrize("password", ["a,b", "true", "null", '"quoted"', "1e3"])
def test_passwords_feast_would_mangle_are_refused_with_the_reason(password: str) -> None:
    url = f"redis://recserve:{quote(password, safe='')}@redis:6379/0"
    with pytest.raises(ValueError, match="password cannot go into Feast's connection string"):
        feast_connection_string(url, 0.1)


@pytest.mark.parametrize(
    ("yaml_file", "profile"),
    [
        ("feature_store.yaml", "embedded"),
        ("profiles/redis.yaml", "redis"),
        ("profiles/cluster.yaml", "cluster"),
    ],
)
def test_yaml_profiles_describe_what_repo_config_builds(
    yaml_file: str, profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEAST_REDIS", "127.0.0.1:6379,db=0")
    monkeypatch.setenv("FEAST_REGISTRY_URL", "postgresql+psycopg://feast@pg:5432/feast")
    from_yaml = load_repo_config(REPO, REPO / yaml_file)
    built = repo_config(
        FeatureStoreConfig(
            profile=profile,
            data_dir=REPO.parent / "data",
            redis_url="redis://127.0.0.1:6379/0",
            registry_url="postgresql+psycopg://feast@pg:5432/feast",
        )
    )
    assert from_yaml.project == built.project
    assert from_yaml.online_store.type == built.online_store.type
    assert from_yaml.registry.registry_type == built.registry.registry_type
    assert from_yaml.offline_store.type == built.offline_store.type
    assert from_yaml.entity_key_serialization_version == built.entity_key_serialization_version
    if profile == "embedded":
        # Relative paths in the YAML resolve against the repo dir to the default data dir.
        assert (REPO / from_yaml.online_store.path).resolve() == Path(
            built.online_store.path
        ).resolve()


def test_feature_services_name_the_model_inputs_of_the_manifest() -> None:
    tower = feature_refs(user_tower_v1)
    for ref in (
        "user_profile:event_count",
        "user_profile:category_prefs",
        "user_realtime:recent_items",
        "user_profile:base_embedding",
        "user_realtime:delta_embedding",
    ):
        assert ref in tower
    ranker = feature_refs(ranker_v1)
    assert {"item_realtime:clicks_5m", "item_realtime:views_1h"} <= set(ranker)
    assert "user_profile:category_prefs" in ranker


def test_materialization_progress_estimates_the_time_left_at_the_rate_so_far() -> None:
    from feature_repo.materialize import Progress

    # 250 of 1,000 rows in 10 s: 750 more at 25 rows/s.
    assert Progress("user_profile", 250, 1_000, 10.0).eta_seconds == 30.0
    assert Progress("user_profile", 0, 1_000, 3.0).eta_seconds is None
    assert Progress("user_profile", 1_000, 1_000, 8.0).eta_seconds == 0.0
