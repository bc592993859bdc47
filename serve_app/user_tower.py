"""UserTower deployment: Feast online read and user tower forward, dynamically batched (`@serve.batch`).

One batch = one pipelined read of the users' real-time hashes, one Feast read of their `user_profile`
rows (plus `seen_items`), one forward pass; the tower's output (the base embedding, fresh from the
current history) is combined with the real-time delta embedding in `recommend.embed_users`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC
from typing import Any

import numpy as np
from feast import FeatureStore
from ray import serve

from feature_repo.store import build_store
from feature_repo.views import BATCH_VIEWS
from serve_app.config import ServeSettings
from serve_app.features import (
    FeatureShapes,
    OnlineFeatureReader,
    UserFeatures,
    connect_redis,
)
from serve_app.metrics import FeatureMetrics, StageMetrics
from serve_app.models import VersionedStage
from serve_app.recommend import Query, ServingModel, UserState, embed_users, with_timing

logger = logging.getLogger(__name__)

SEEN_ITEMS_REF = "user_profile:seen_items"


def read_seen_items(store: FeatureStore, user_ids: Sequence[str]) -> list[tuple[str, ...]] | None:
    """`user_profile:seen_items` per user (empty for unknown users); None when the store fails."""
    try:
        response = store.get_online_features(
            features=[SEEN_ITEMS_REF], entity_rows=[{"user_id": u} for u in user_ids]
        ).to_dict()
    except Exception as exc:  # a read must never fail a request: the caller degrades
        logger.warning("seen items unavailable: %s", exc)
        return None
    return [tuple(v or ()) for v in response["seen_items"]]


def realtime_ages(last_event_ts: np.ndarray, now: float) -> list[float]:
    """Seconds since each user's last real-time update (epoch seconds, NaN: none): users without
    real-time state are left out, a timestamp ahead of `now` (client clock) counts as 0."""
    known = last_event_ts[np.isfinite(last_event_ts)]
    return [max(0.0, now - float(t)) for t in known]


def materialized_until(store: FeatureStore, views: Sequence[str]) -> dict[str, float]:
    """End of the newest materialization of each view (epoch seconds), from a fresh registry read;
    a view never materialized is left out."""
    store.refresh_registry()
    ends = {}
    for name in views:
        end = store.get_feature_view(name).most_recent_end_time
        if end is not None:
            # Feast stores these ends in UTC, naive on some registry backends.
            ends[name] = (end if end.tzinfo else end.replace(tzinfo=UTC)).timestamp()
    return ends


def feature_shapes(model: ServingModel) -> FeatureShapes:
    manifest = model.bundle.manifest
    return FeatureShapes(
        n_categories=len(manifest.categories),
        embedding_dim=manifest.embedding_dim,
        history_length=model.history_length,
    )


@dataclass(frozen=True)
class UserFeatureSource:
    """The online reads of one batch: real-time hashes + `user_profile` (Feast), and seen items."""

    reader: OnlineFeatureReader
    store: FeatureStore
    store_on_redis: bool

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> UserFeatureSource:
        fs = settings.feature_store
        store = build_store(fs)
        reader = OnlineFeatureReader(
            store,
            connect_redis(settings.event_redis_url, settings.redis_timeout_seconds),
            key_prefix=settings.realtime.key_prefix,
            store_on_redis=fs.resolved_profile != "embedded",
            breaker_cooldown_seconds=settings.realtime.breaker_cooldown_seconds,
        )
        return cls(reader, store, fs.resolved_profile != "embedded")

    def read(
        self, model: ServingModel, user_ids: Sequence[str]
    ) -> tuple[UserFeatures, list[tuple[str, ...]] | None]:
        features = self.reader.users(user_ids, feature_shapes(model), model_version=model.version)
        if features.degraded and self.store_on_redis:
            # The online store shares the Redis that just failed: a second read would only wait
            # for its timeout. (The embedded SQLite store still answers when Redis is down.)
            return features, None
        return features, read_seen_items(self.store, user_ids)


@serve.deployment
class UserTower(VersionedStage):
    def __init__(self, settings: ServeSettings) -> None:
        self._init_models(settings)
        self._features = UserFeatureSource.from_settings(settings)
        self._metrics = StageMetrics("user_tower")
        self._read_metrics = StageMetrics("feature_read")
        self._freshness = FeatureMetrics()
        batcher: Any = self.embed_batch  # serve.batch adds the setters to the method
        batcher.set_max_batch_size(settings.batching.max_batch_size)
        batcher.set_batch_wait_timeout_s(settings.batching.batch_wait_timeout_seconds)
        for model in self._preloaded.values():  # first Feast/Redis reads open connections
            self._features.read(model, ["warm-up"])
        # A store of its own: its registry is refreshed in a thread while requests read features.
        self._task = asyncio.get_running_loop().create_task(
            self._watch_materialization(
                build_store(settings.feature_store), settings.monitoring.sample_interval_seconds
            )
        )

    async def _watch_materialization(self, store: FeatureStore, interval: float) -> None:
        views = [view.name for view in BATCH_VIEWS]
        while True:
            try:
                ends = await asyncio.to_thread(materialized_until, store, views)
                self._freshness.materialized_until(ends)
            except Exception as exc:  # an unreadable registry must not end the watch
                logger.warning("feature registry unreadable: %s", exc)
            await asyncio.sleep(interval)

    def __del__(self) -> None:
        task: Any = getattr(self, "_task", None)
        if task is not None:
            task.cancel()

    async def embed(self, query: Query) -> UserState:
        state: UserState = await self.embed_batch(query)
        return state

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def embed_batch(self, queries: list[Query]) -> list[UserState]:
        # Serve splits batches by multiplexed version; the query carries it too.
        model = await self.model(queries[0].model_version)
        start = time.perf_counter()
        features, seen = self._features.read(model, [q.user_id for q in queries])
        read = time.perf_counter()
        states = embed_users(model, queries, features, seen, self._ranking)
        end = time.perf_counter()
        self._read_metrics.observe((read - start) * 1000.0)
        self._metrics.observe((end - read) * 1000.0)
        self._metrics.batch_size.observe(len(queries))
        self._freshness.realtime_ages(realtime_ages(features.last_event_ts, time.time()))
        return [
            replace(
                s,
                timings=with_timing(
                    with_timing(s.timings, "user_features", start, read), "user_tower", start, end
                ),
            )
            for s in states
        ]
