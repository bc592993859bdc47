"""User tower host: Feast online read and user tower forward for a batch of requests.

Hosted by a group deployment (`serve_app.deployments.group`: `UserTower` alone, `Retrieval`, ...) or
by the Ingress (`fused`); it does not know which.

One batch (per bundle version in it) = one pipelined read of the users' real-time hashes, one Feast read
of their `user_profile` rows (`seen_items` with them), one forward pass; the tower's output (the base
embedding, fresh from the current history) is combined with the real-time delta embedding in
`stages.user_tower.embed_users`. Loads only the tower (`stages.user_tower.TowerModel`). Torch is not
imported (the tower runs in numpy, Feast is imported without it) unless a bundle has no npz weights.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC
from typing import TYPE_CHECKING, Any

import numpy as np

from serve_app.config import ServeSettings
from serve_app.features import (
    FeatureShapes,
    OnlineFeatureReader,
    UserFeatures,
    build_feature_store,
)
from serve_app.metrics import FeatureMetrics, StageMetrics
from serve_app.models import VersionedStage
from serve_app.stages.records import Query, UserState, version_of, with_timing
from serve_app.stages.user_tower import TowerModel, embed_users

if TYPE_CHECKING:  # Feast is imported by build_feature_store, without torch
    from feast import FeatureStore

logger = logging.getLogger(__name__)

SEEN_ITEMS = ("user_profile:seen_items",)  # read with the tower's own Feast columns


def seen_items_of(features: UserFeatures) -> list[tuple[str, ...]] | None:
    """`user_profile:seen_items` per user (empty for unknown users) from the batch's one Feast read
    (`OnlineFeatureReader.users(extra_refs=SEEN_ITEMS)`); None when it was not read or failed."""
    column = None if features.extra is None else features.extra.get("seen_items")
    if column is None:
        return None
    return [tuple(v or ()) for v in column]


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


def feature_shapes(model: TowerModel) -> FeatureShapes:
    terms = model.terms
    return FeatureShapes(
        n_categories=len(terms.categories),
        embedding_dim=terms.embedding_dim,
        history_length=terms.history_length,
    )


@dataclass(frozen=True)
class UserFeatureSource:
    """The online reads of one batch: real-time hashes + `user_profile` (Feast), seen items with it."""

    reader: OnlineFeatureReader

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> UserFeatureSource:
        return cls(OnlineFeatureReader.from_settings(settings))

    def read(
        self, model: TowerModel, user_ids: Sequence[str]
    ) -> tuple[UserFeatures, list[tuple[str, ...]] | None]:
        features = self.reader.users(
            user_ids, feature_shapes(model), model_version=model.version, extra_refs=SEEN_ITEMS
        )
        return features, seen_items_of(features)


class UserTowerHost(VersionedStage[TowerModel]):
    """The user tower stage, its Feast reads, metrics and the materialization watch."""

    name = "user_tower"

    def __init__(self, settings: ServeSettings) -> None:
        self._init_models(settings, TowerModel.from_directory)
        self._features = UserFeatureSource.from_settings(settings)
        self.metrics = StageMetrics("user_tower")
        self._read_metrics = StageMetrics("feature_read")
        self._freshness = FeatureMetrics()
        for model in self._models.values():  # first Feast/Redis reads open connections
            self._features.read(model, ["warm-up"])
        # A store of its own: its registry is refreshed in a thread while requests read features.
        self._task = asyncio.get_running_loop().create_task(
            self._watch_materialization(
                build_feature_store(settings.feature_store),
                settings.monitoring.sample_interval_seconds,
            )
        )

    async def _watch_materialization(self, store: FeatureStore, interval: float) -> None:
        from feature_repo.views import BATCH_VIEWS  # Feast: imported by build_feature_store

        views = [view.name for view in BATCH_VIEWS]
        while True:
            try:
                ends = await asyncio.to_thread(materialized_until, store, views)
                self._freshness.materialized_until(ends)
            except Exception as exc:  # an unreadable registry must not end the watch
                logger.warning("feature registry unreadable: %s", exc)
            await asyncio.sleep(interval)

    def close(self) -> None:
        task: Any = getattr(self, "_task", None)
        if task is not None:
            task.cancel()

    def __del__(self) -> None:
        self.close()

    async def run(self, queries: list[Query]) -> list[UserState]:
        """Each query's user state (embedding, history, preferences), in order."""
        return await self.each_version(queries, version_of, self._embed_version)

    def _embed_version(self, model: TowerModel, queries: list[Query]) -> list[UserState]:
        start = time.perf_counter()
        features, seen = self._features.read(model, [q.user_id for q in queries])
        read = time.perf_counter()
        states = embed_users(model, queries, features, seen, self._ranking)
        end = time.perf_counter()
        self._read_metrics.observe((read - start) * 1000.0)
        self.metrics.observe((end - read) * 1000.0)
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
