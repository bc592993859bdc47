"""The Feast online client and its fallbacks: user and item features for one request, never raising.

How real-time state reaches serving (measured in `bench/feature_store.py`, see feature_repo/README.md):
the batch views (`user_profile`) are read through Feast's online store; the real-time views
(`user_realtime`, `item_realtime`) are Redis hashes that `serve_app.events` updates atomically with a
Lua script on every event, and this module reads them directly (one pipelined HGETALL per entity).
A Feast push per event costs 3-4 ms on Redis (20+ ms on SQLite) and overwrites whole rows, which loses
concurrent counter and EMA updates; the hashes keep writes atomic and fast, and the Feast views
`user_realtime`/`item_realtime` remain the schema contract: the fields returned here are theirs.

Defaults when a source cannot be read (Redis down, registry missing), with `degraded=True`:
event_count 0, category_prefs zeros [C], base_embedding zeros [D] (`has_base_embedding` False),
recent_items empty, delta_embedding zeros [D], counters 0, last_event_ts NaN. An unknown (cold) user
gets the same values with `degraded=False`. After a Redis failure, reads skip Redis for
`breaker_cooldown_seconds` and answer with defaults at once instead of waiting on timeouts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from serve_app.config import ServeSettings
from serve_app.imports import import_feast
from serve_app.redis_client import connect_redis

if TYPE_CHECKING:
    from feast import FeatureStore

    from feature_repo.config import FeatureStoreConfig

logger = logging.getLogger(__name__)

WINDOW_SLOTS = 60  # one-minute slots in the counters' ring: covers the 1 h window
US_PER_MINUTE = 60_000_000


def build_feature_store(config: FeatureStoreConfig) -> FeatureStore:
    """`feature_repo.store.build_store`, Feast imported without torch (`serve_app.imports`)."""
    import_feast()
    from feature_repo.store import build_store

    return build_store(config)


@cache
def user_batch_refs() -> tuple[str, ...]:
    """The batch part of user_tower_v1, read through Feast; the real-time part is read from the
    hashes. (Feast is imported here, not with the module: the Redis layout below is all the event
    path and the Ingress need, and Feast with what it imports is ~270 MiB per process.)"""
    import_feast()
    from feature_repo.services import feature_refs, user_tower_v1
    from feature_repo.views import BATCH_VIEWS

    names = frozenset(v.name for v in BATCH_VIEWS)
    return tuple(r for r in feature_refs(user_tower_v1) if r.split(":")[0] in names)


# --- Redis layout of the real-time state (written by serve_app.events) ------------------------


def user_state_key(prefix: str, user_id: str) -> str:
    return f"{prefix}:u:{user_id}"


def item_state_key(prefix: str, item_id: str) -> str:
    return f"{prefix}:i:{item_id}"


# User hash fields: d = delta embedding (float32 LE bytes), dv = its model version, r = recent items
# (space-separated, newest first; ids never contain spaces), t = latest event time (µs since epoch),
# s<slot> = minute held by a counter slot, c<slot> = events in that minute.
# Item hash fields: s<slot>, c<slot> = positive events, v<slot> = views.


# --- pure logic -------------------------------------------------------------------------------


def window_count(raw: Mapping[bytes, bytes], counter: bytes, now_minute: int, minutes: int) -> int:
    """Events counted in the `minutes` one-minute slots ending at `now_minute` (inclusive)."""
    total = 0
    for key, value in raw.items():
        if key[:1] != b"s":
            continue
        age = now_minute - int(value)
        if 0 <= age < minutes:
            total += int(raw.get(counter + key[1:], b"0"))
    return total


@dataclass(frozen=True)
class UserRealtimeState:
    """One user's `user_realtime` view, decoded from its hash at a given time."""

    delta_embedding: np.ndarray | None  # float32 [D]
    delta_model_version: str | None
    recent_items: tuple[str, ...]  # since the last batch snapshot, newest first
    count_5m: int
    count_1h: int
    last_event_ts: float | None  # epoch seconds


EMPTY_USER_STATE = UserRealtimeState(None, None, (), 0, 0, None)


def parse_user_state(raw: Mapping[bytes, bytes], now_minute: int) -> UserRealtimeState:
    """Decode a user hash (HGETALL reply); an empty reply is the empty state."""
    if not raw:
        return EMPTY_USER_STATE
    delta = raw.get(b"d")
    version = raw.get(b"dv")
    last = raw.get(b"t")
    return UserRealtimeState(
        delta_embedding=np.frombuffer(delta, dtype="<f4").copy() if delta else None,
        delta_model_version=version.decode() if version else None,
        recent_items=tuple(raw.get(b"r", b"").decode().split()),
        count_5m=window_count(raw, b"c", now_minute, 5),
        count_1h=window_count(raw, b"c", now_minute, 60),
        last_event_ts=int(last) / 1e6 if last else None,
    )


def merge_recent(realtime: Sequence[str], batch: Sequence[str], length: int) -> tuple[str, ...]:
    """Items since the snapshot (newest first) ahead of the snapshot's history, distinct, at most
    `length`. An item already in the history keeps its place there: offline, the history orders items
    by their first positive interaction, and a repeat does not move an item."""
    in_batch = set(batch)
    merged = [i for i in realtime if i not in in_batch]
    merged.extend(batch)
    seen: set[str] = set()
    out = []
    for item in merged:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return tuple(out[:length])


@dataclass(frozen=True)
class FeatureShapes:
    """Sizes the served bundle expects, so defaults and checks match its model (manifest values)."""

    n_categories: int
    embedding_dim: int
    history_length: int


@dataclass(frozen=True)
class UserFeatures:
    """`user_tower_v1` for a batch of users, in request order (see the module docstring for defaults)."""

    user_ids: tuple[str, ...]
    event_count: np.ndarray  # float32 [B]
    category_prefs: np.ndarray  # float32 [B, C]
    base_embedding: np.ndarray  # float32 [B, D]
    has_base_embedding: np.ndarray  # bool [B]
    recent_items: tuple[tuple[str, ...], ...]  # history + events since, newest first, <= L
    delta_embedding: np.ndarray  # float32 [B, D]; zeros when absent or from another bundle
    count_5m: np.ndarray  # int64 [B]
    count_1h: np.ndarray  # int64 [B]
    last_event_ts: np.ndarray  # float64 [B], epoch seconds, NaN when no event was seen
    degraded: bool
    # Columns of the `extra_refs` a caller read in the same Feast call (`to_dict()` names, request
    # order); None when Feast was not read or failed.
    extra: Mapping[str, list[Any]] | None = None


@dataclass(frozen=True)
class ItemRealtime:
    """`item_realtime` for candidate items, in request order; zeros when unknown or degraded."""

    item_ids: tuple[str, ...]
    clicks_5m: np.ndarray  # int64 [N]: positive events
    views_5m: np.ndarray
    clicks_1h: np.ndarray
    views_1h: np.ndarray
    degraded: bool


def _vector(value: Any, size: int) -> np.ndarray | None:
    if value is None or len(value) != size:
        return None
    return np.asarray(value, dtype=np.float32)


def assemble_user_features(
    user_ids: Sequence[str],
    batch: Mapping[str, Sequence[Any]] | None,
    realtime: Sequence[UserRealtimeState] | None,
    shapes: FeatureShapes,
    model_version: str | None,
    degraded: bool,
    extra: Mapping[str, list[Any]] | None = None,
) -> UserFeatures:
    """Combine Feast's batch columns (`to_dict()` of user_batch_refs(); None: unread) with decoded
    real-time states (None: unread) into typed arrays; unread parts take the defaults. `extra`
    (columns read with `batch` for the caller) is passed through as it is.

    A vector of the wrong length (a profile written for another bundle) counts as missing, and so
    does a delta embedding built from another bundle's item embeddings.
    """
    b, c, d = len(user_ids), shapes.n_categories, shapes.embedding_dim
    count = np.zeros(b, dtype=np.float32)
    prefs = np.zeros((b, c), dtype=np.float32)
    base = np.zeros((b, d), dtype=np.float32)
    has_base = np.zeros(b, dtype=bool)
    delta = np.zeros((b, d), dtype=np.float32)
    c5 = np.zeros(b, dtype=np.int64)
    c60 = np.zeros(b, dtype=np.int64)
    last = np.full(b, np.nan, dtype=np.float64)
    recent: list[tuple[str, ...]] = []
    for row in range(b):
        history: Sequence[str] = ()
        if batch is not None:
            n = batch["event_count"][row]
            count[row] = 0.0 if n is None or (isinstance(n, float) and math.isnan(n)) else n
            p = _vector(batch["category_prefs"][row], c)
            if p is not None:
                prefs[row] = p
            e = _vector(batch["base_embedding"][row], d)
            if e is not None:
                base[row] = e
                has_base[row] = True
            history = batch["recent_items"][row] or ()
        state = realtime[row] if realtime is not None else EMPTY_USER_STATE
        if (
            state.delta_embedding is not None
            and len(state.delta_embedding) == d
            and state.delta_model_version == model_version
        ):
            delta[row] = state.delta_embedding
        c5[row] = state.count_5m
        c60[row] = state.count_1h
        if state.last_event_ts is not None:
            last[row] = state.last_event_ts
        recent.append(merge_recent(state.recent_items, history, shapes.history_length))
    return UserFeatures(
        user_ids=tuple(user_ids),
        event_count=count,
        category_prefs=prefs,
        base_embedding=base,
        has_base_embedding=has_base,
        recent_items=tuple(recent),
        delta_embedding=delta,
        count_5m=c5,
        count_1h=c60,
        last_event_ts=last,
        degraded=degraded,
        extra=extra,
    )


# --- the reader -------------------------------------------------------------------------------


class _Breaker:
    """Skips a failing dependency for `cooldown` seconds after a failure, then tries again."""

    def __init__(self, cooldown: float, clock: Callable[[], float]) -> None:
        self._cooldown = cooldown
        self._clock = clock
        self._open_until = 0.0

    def allows(self) -> bool:
        return self._clock() >= self._open_until

    def trip(self) -> None:
        self._open_until = self._clock() + self._cooldown


class OnlineFeatureReader:
    """Reads `user_tower_v1` (Feast batch views + real-time hashes) and `item_realtime`.

    `store` may be None: real-time features only (batch parts take their defaults, not degraded). `store_on_redis`: Feast's online store is the same Redis,
    so while the breaker is open Feast is skipped too (its own client would wait out retries).
    """

    def __init__(
        self,
        store: FeatureStore | None,
        client: redis.Redis,
        *,
        key_prefix: str,
        store_on_redis: bool,
        breaker_cooldown_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._client = client
        self._prefix = key_prefix
        self._store_on_redis = store_on_redis
        self._clock = clock
        self._breaker = _Breaker(breaker_cooldown_seconds, time.monotonic)

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> OnlineFeatureReader:
        """The reader of the configured profile (builds the Feast store and the Redis client)."""
        fs = settings.feature_store
        return cls(
            build_feature_store(fs),
            connect_redis(settings.event_redis_url, settings.redis_timeout_seconds),
            key_prefix=settings.realtime.key_prefix,
            store_on_redis=fs.resolved_profile != "embedded",
            breaker_cooldown_seconds=settings.realtime.breaker_cooldown_seconds,
        )

    def _hgetall(self, keys: Iterable[str]) -> list[dict[bytes, bytes]] | None:
        if not self._breaker.allows():
            return None
        try:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return list(pipe.execute())
        except redis.RedisError as exc:
            self._breaker.trip()
            logger.warning("real-time features unavailable, serving defaults: %s", exc)
            return None

    def _batch(
        self, user_ids: Sequence[str], extra_refs: Sequence[str] = ()
    ) -> dict[str, list[Any]] | None:
        if self._store_on_redis and not self._breaker.allows():
            return None
        assert self._store is not None
        try:
            response = self._store.get_online_features(
                features=[*user_batch_refs(), *extra_refs],
                entity_rows=[{"user_id": u} for u in user_ids],
            )
            result: dict[str, list[Any]] = response.to_dict()
            return result
        except Exception as exc:  # a read must never raise: any store failure degrades
            if self._store_on_redis:
                self._breaker.trip()
            logger.warning("batch features unavailable, serving defaults: %s", exc)
            return None

    def users(
        self,
        user_ids: Sequence[str],
        shapes: FeatureShapes,
        *,
        model_version: str | None,
        now: float | None = None,
        extra_refs: Sequence[str] = (),
    ) -> UserFeatures:
        """Features of `user_ids` for the bundle `model_version` (its delta embeddings only): one
        pipelined read of the real-time hashes and one Feast read, which also reads `extra_refs`
        (`view:feature`, returned in `UserFeatures.extra`)."""
        now_minute = int((self._clock() if now is None else now) * 1e6) // US_PER_MINUTE
        # Real-time first: it is the cheap probe of Redis that trips the breaker before Feast's
        # own (slow-retrying) client would be tried on a dead server.
        raw = self._hgetall(user_state_key(self._prefix, u) for u in user_ids)
        realtime = None if raw is None else [parse_user_state(r, now_minute) for r in raw]
        batch = None if self._store is None else self._batch(user_ids, extra_refs)
        degraded = raw is None or (self._store is not None and batch is None)
        names = (ref.split(":", 1)[1] for ref in extra_refs)  # to_dict() names the bare feature
        extra = None if batch is None else {name: batch[name] for name in names}
        return assemble_user_features(
            user_ids, batch, realtime, shapes, model_version, degraded, extra
        )

    def items(self, item_ids: Sequence[str], *, now: float | None = None) -> ItemRealtime:
        """Short-window counters of candidate items (one pipelined read for all of them)."""
        now_minute = int((self._clock() if now is None else now) * 1e6) // US_PER_MINUTE
        raw = self._hgetall(item_state_key(self._prefix, i) for i in item_ids)
        n = len(item_ids)
        out = {k: np.zeros(n, dtype=np.int64) for k in ("c5", "v5", "c60", "v60")}
        if raw is not None:
            for row, fields in enumerate(raw):
                out["c5"][row] = window_count(fields, b"c", now_minute, 5)
                out["v5"][row] = window_count(fields, b"v", now_minute, 5)
                out["c60"][row] = window_count(fields, b"c", now_minute, 60)
                out["v60"][row] = window_count(fields, b"v", now_minute, 60)
        return ItemRealtime(
            item_ids=tuple(item_ids),
            clicks_5m=out["c5"],
            views_5m=out["v5"],
            clicks_1h=out["c60"],
            views_1h=out["v60"],
            degraded=raw is None,
        )
