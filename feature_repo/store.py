"""Build a Feast `FeatureStore` from `FeatureStoreConfig` (no YAML editing), apply, materialize.

The `RepoConfig` is assembled here from settings; the YAML files beside this module describe the same
profiles for the `feast` CLI and are checked against `repo_config` by the tests. The project CLI wraps
`apply` and `materialize_incremental`; the rows are written in chunks by `feature_repo.materialize`
(Feast's bytes, Feast's registry record, minutes instead of hours at a million users).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlparse

from feast import FeatureStore
from feast.repo_config import RepoConfig

from feature_repo.config import FeatureStoreConfig
from feature_repo.entities import item, user
from feature_repo.materialize import (
    DEFAULT_CHUNK_ROWS,
    ProgressCallback,
    ViewResult,
    log_progress,
    materialize_views,
)
from feature_repo.services import SERVICES
from feature_repo.sources import (
    item_profile_source,
    item_realtime_push_source,
    user_profile_source,
    user_realtime_push_source,
)
from feature_repo.views import BATCH_VIEWS, REALTIME_VIEWS

# Rows before this are not data: the first materialization of a view starts here rather than at
# Feast's "now - 52 weeks" for ttl=0 views, which would skip data sets stamped years ago (MovieLens).
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BATCH_VIEW_NAMES = tuple(v.name for v in BATCH_VIEWS)


def definitions() -> list[Any]:
    """Every Feast object of the repo, in the order `FeatureStore.apply` wants them."""
    return [
        user,
        item,
        user_profile_source,
        item_profile_source,
        user_realtime_push_source,
        item_realtime_push_source,
        *BATCH_VIEWS,
        *REALTIME_VIEWS,
        *SERVICES,
    ]


def _feast_credential(name: str, value: str) -> str:
    """`value` as Feast's connection string carries it, or ValueError naming the URL part.

    Feast splits the string on "," and JSON-decodes every value, so a comma would cut the
    credential and `true`, `null` or `"x"` would reach Redis as something else (digits survive:
    the client sends the number's text)."""
    try:
        decoded = json.loads(value)
    except ValueError:
        decoded = value
    if "," in value or str(decoded) != value:
        raise ValueError(
            f"the Redis URL's {name} cannot go into Feast's connection string (no comma, "
            "and not a JSON literal such as true, null or a quoted string): choose another"
        )
    return value


def feast_connection_string(redis_url: str, timeout_seconds: float) -> str:
    """Feast's Redis connection string ("host:port,db=0,...") for a redis:// or rediss:// URL;
    the URL's user and password (an ACL user, as the chart's bundled Redis has) are passed on."""
    parsed = urlparse(redis_url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis:// or rediss:// URL: {redis_url!r}")
    parts = [f"{parsed.hostname or 'localhost'}:{parsed.port or 6379}"]
    db = parsed.path.lstrip("/")
    parts.append(f"db={int(db) if db else 0}")
    if parsed.username:
        parts.append(f"username={_feast_credential('user', unquote(parsed.username))}")
    if parsed.password:
        parts.append(f"password={_feast_credential('password', unquote(parsed.password))}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    parts.append(f"socket_timeout={timeout_seconds}")
    parts.append(f"socket_connect_timeout={timeout_seconds}")
    return ",".join(parts)


def repo_config(config: FeatureStoreConfig) -> RepoConfig:
    """The Feast `RepoConfig` of a profile; batch source paths resolve against `config.data_dir`."""
    profile = config.resolved_profile
    online: dict[str, Any]
    if profile == "embedded":
        online = {"type": "sqlite", "path": str(config.feast_dir / "online.db")}
    else:
        assert config.redis_url is not None  # checked by FeatureStoreConfig
        online = {
            "type": "redis",
            "connection_string": feast_connection_string(
                config.redis_url, config.online_timeout_seconds
            ),
        }
    registry: dict[str, Any]
    if profile == "cluster":
        registry = {
            "registry_type": "sql",
            "path": config.registry_url,
            "cache_ttl_seconds": config.registry_cache_ttl_seconds,
            # One shared registry: other pods apply too, so never trust a stale local copy.
            "sqlalchemy_config_kwargs": {"pool_pre_ping": True},
        }
    else:
        registry = {
            "registry_type": "file",
            "path": str(config.feast_dir / "registry.db"),
            "cache_ttl_seconds": config.registry_cache_ttl_seconds,
        }
    return RepoConfig(
        project=config.project,
        provider="local",
        registry=registry,
        online_store=online,
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=config.data_dir.resolve(),
    )


def build_store(config: FeatureStoreConfig) -> FeatureStore:
    """A `FeatureStore` for the profile; local directories are created, nothing is applied."""
    # The embedded profile's registry and SQLite file live here; the file registry of the redis
    # profile too. Harmless for the cluster profile (nothing is written there).
    config.feast_dir.mkdir(parents=True, exist_ok=True)
    return FeatureStore(config=repo_config(config))


def apply(config: FeatureStoreConfig) -> FeatureStore:
    """Register every definition (entities, sources, views, services) and create online tables."""
    store = build_store(config)
    store.apply(definitions())
    return store


def materialize(
    config: FeatureStoreConfig,
    start: datetime,
    end: datetime,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: ProgressCallback | None = log_progress,
) -> FeatureStore:
    """Load the batch views' rows stamped in [start, end] into the online store (latest per entity)."""
    store = build_store(config)
    materialize_views(store, BATCH_VIEW_NAMES, start, end, chunk_rows, progress)
    return store


def materialize_incremental(
    config: FeatureStoreConfig,
    end: datetime,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: ProgressCallback | None = log_progress,
) -> FeatureStore:
    """Load batch rows stamped after the previous materialization's end, up to `end`.

    A view never materialized starts at the epoch. Rows are picked by their `event_timestamp`, so a
    table re-written with timestamps before the previous `end` is not picked up again: use
    `materialize` over the full range after re-writing history.
    """
    store = build_store(config)
    results: list[ViewResult] = []
    for name in BATCH_VIEW_NAMES:
        previous = store.get_feature_view(name).most_recent_end_time
        # As Feast's materialize_incremental: from the previous end (ttl=0 views have no window).
        start = EPOCH if previous is None else previous
        results += materialize_views(store, [name], start, end, chunk_rows, progress)
    return store
