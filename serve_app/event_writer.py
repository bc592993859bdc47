"""EventWriter deployment: appends events to the Redis Stream and updates real-time features.

A thin shell over `serve_app.events.EventLogWriter`. Delta embeddings are built from the item vectors
of the version the router serves (followed every polling interval); a failure of Redis raises
`FeatureStoreUnavailable`, which the ingress answers with 503: events are never dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import ServeSettings
from serve_app.errors import RecserveError
from serve_app.metrics import EventLogMetrics
from serve_app.models import ModelSource
from serve_app.schemas import Event

if TYPE_CHECKING:  # imported in the replica only: they pull in Feast, the ingress must not
    from serve_app.events import EventLogWriter, ItemEmbeddings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventWriteSummary:
    """What the ingress needs back: events logged (new) and recognised as retries."""

    written: int
    duplicates: int


def load_item_embeddings(source: ModelSource, version: str) -> ItemEmbeddings:
    """Only the item vectors of a verified bundle version (no tower, index or ranker)."""
    from serve_app.events import ItemEmbeddings

    path = source.fetch(version)  # verified against the manifest's checksums
    item_ids = np.load(path / "item_ids.npy", allow_pickle=False)
    vectors = np.load(path / "item_embeddings.npy", allow_pickle=False)
    index = {str(item): row for row, item in enumerate(item_ids.tolist())}
    return ItemEmbeddings(model_version=version, item_index=index, vectors=vectors)


@serve.deployment
class EventWriter:
    def __init__(self, settings: ServeSettings, router: DeploymentHandle) -> None:
        from serve_app.events import EventLogWriter

        self._writer: EventLogWriter = EventLogWriter.from_settings(settings)
        self._source = ModelSource.from_settings(settings)
        self._router = router
        self._interval = settings.models.poll_interval_seconds
        self._embeddings: ItemEmbeddings | None = None
        try:
            self._embeddings = load_item_embeddings(self._source, self._source.resolve())
        except RecserveError as exc:
            # Events are still logged; delta embeddings start once a version is served.
            logger.warning("no bundle at start (%s): events logged without delta", exc.message)
        self._metrics = EventLogMetrics()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._follow_router())
        self._sampler = loop.create_task(
            self._sample_stream(settings.monitoring.sample_interval_seconds)
        )

    async def _sample_stream(self, interval: float) -> None:
        """The stream's length and every consumer group's backlog, every `interval` seconds."""
        while True:
            try:
                stats = await asyncio.to_thread(self._writer.stream_stats)
                self._metrics.stream_length(stats.length)
                for group in stats.groups:
                    self._metrics.group(
                        group.name, group.undelivered, group.pending, stats.lag_seconds(group)
                    )
            except Exception as exc:  # Redis down: the write path reports it; keep sampling
                logger.warning("event stream stats unavailable: %s", exc)
            await asyncio.sleep(interval)

    async def _follow_router(self) -> None:
        """Use the item vectors of the version the router serves (never a refused one)."""
        while True:
            try:
                state = await self._router.readiness.remote()
                version = state.model_version
                current = self._embeddings.model_version if self._embeddings else None
                if version is not None and version != current:
                    self._embeddings = await asyncio.to_thread(
                        load_item_embeddings, self._source, version
                    )
                    logger.info("delta embeddings now from version %s", version)
            except Exception as exc:  # the router restarting must not stop the loop
                logger.warning("could not follow the served version: %s", exc)
            await asyncio.sleep(self._interval)

    async def write(self, events: Sequence[Event]) -> EventWriteSummary:
        """Log and apply `events` in order; FeatureStoreUnavailable when Redis fails."""
        # In a thread: one pipelined round trip, and other batches may be written meanwhile.
        result = await asyncio.to_thread(self._writer.write, list(events), self._embeddings)
        return EventWriteSummary(written=result.accepted, duplicates=result.duplicates)

    def __del__(self) -> None:
        for name in ("_task", "_sampler"):
            task: Any = getattr(self, name, None)
            if task is not None:
                task.cancel()
