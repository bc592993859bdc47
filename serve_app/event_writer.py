"""EventWriter deployment: appends events to the Redis Stream, updates real-time features, attributes.

A thin shell over `serve_app.events.EventLogWriter`, behind the local spool (`serve_app.spool`): while
Redis is unavailable accepted events are spooled (answered 202 with `spooled`) and a background task
replays them in order through the same write path when it answers again, so real-time features and
attribution catch up exactly once; a full spool raises `SpoolFull` (503, Retry-After). With the spool
disabled a failure of Redis raises `FeatureStoreUnavailable` (503): never dropped silently.

The served bundle's list of training users (`contract.KNOWN_USERS_FILE`) loads with its item vectors: the
real-time state of a user not on it (cold) expires after `realtime.cold_user_ttl_seconds`.

A user's delta embedding is built from the item vectors of the version their A/B variant serves (the
ingress sends its router's versions with every batch; a version's vectors load in the background, the
default space is used meanwhile), so each arm's user tower reads a delta in its own space. Newly
logged events (not retries) are then credited to the variant that served them
(`ExperimentLog.attribute`); an attribution failure is logged and does not fail the write.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from serve_app.config import ServeSettings
from serve_app.contract import KNOWN_USERS_FILE
from serve_app.errors import BundleIntegrityError, RecserveError
from serve_app.experiments import ExperimentLog, assign_variant
from serve_app.metrics import EventLogMetrics
from serve_app.models import ModelSource
from serve_app.router import ServedVersions
from serve_app.schemas import Event
from serve_app.spool import EventSpool, ReplayStep, SpooledLog, replay_forever, replay_orphans

if TYPE_CHECKING:  # imported in the replica only: they pull in Feast, the ingress must not
    from serve_app.events import EventLogWriter, ItemEmbeddings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventWriteSummary:
    """What the ingress needs back: events logged (new), recognised as retries, and the new clicks
    by variant (the variant that served the clicked list, else the user's bucket)."""

    written: int
    duplicates: int
    clicks: dict[str, int] = field(default_factory=dict)
    spooled: int = 0  # events kept in the local spool (Redis unavailable), replayed later
    attributed: dict[tuple[str, str], int] = field(default_factory=dict)


def load_known_users(path: Path, files: Mapping[str, str]) -> np.ndarray | None:
    """The bundle's training users (`KNOWN_USERS_FILE`, memory-mapped), None when it has no list
    (`files`: the manifest's, already verified); BundleIntegrityError when the array is not sorted
    unique uint64 keys."""
    if KNOWN_USERS_FILE not in files:
        return None
    keys = np.load(path / KNOWN_USERS_FILE, mmap_mode="r", allow_pickle=False)
    if keys.dtype != np.uint64 or keys.ndim != 1 or bool(np.any(keys[1:] <= keys[:-1])):
        raise BundleIntegrityError("not sorted unique uint64 user keys", file=KNOWN_USERS_FILE)
    return keys


def load_item_embeddings(source: ModelSource, version: str) -> ItemEmbeddings:
    """Only the item vectors (and the known users) of a verified bundle version (no tower, index
    or ranker)."""
    from serve_app import bundle
    from serve_app.events import ItemEmbeddings

    path = source.fetch(version)  # verified against the manifest's checksums
    manifest = bundle.read_manifest(path)
    # Memory-mapped, ids as a sorted array (serve_app.ids.ItemIndex): no per-replica dict of the catalog.
    _, index = bundle.load_item_ids(path, manifest)
    vectors = bundle.load_item_embeddings(path, manifest)
    known = load_known_users(path, manifest.files)
    return ItemEmbeddings(
        model_version=version, item_index=index, vectors=vectors, known_users=known
    )


@serve.deployment
class EventWriter:
    def __init__(self, settings: ServeSettings) -> None:
        from serve_app.events import EventLogWriter
        from serve_app.redis_client import connect_redis

        self._writer: EventLogWriter = EventLogWriter.from_settings(settings)
        self._source = ModelSource.from_settings(settings)
        experiment = settings.experiment
        self._salt, self._weights = experiment.salt, experiment.weights
        self._log = ExperimentLog(
            connect_redis(settings.event_redis_url, settings.redis_timeout_seconds),
            experiment.key_prefix,
            experiment.name,
            experiment.attribution_window_seconds,
        )
        # Item vectors per served version; the first variant's version for users of a variant
        # without one (and before the ingress names them).
        self._embeddings: dict[str, ItemEmbeddings] = {}
        # Versions whose vectors are loading, with their task (kept so that it is not collected).
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._served = ServedVersions({}, None)
        try:
            version = self._source.resolve()
            self._embeddings[version] = load_item_embeddings(self._source, version)
            self._served = ServedVersions({}, version)
        except RecserveError as exc:
            # Events are still logged; delta embeddings start once a version is served.
            logger.warning("no bundle at start (%s): events logged without delta", exc.message)
        self._metrics = EventLogMetrics()
        loop = asyncio.get_running_loop()
        self._spooled: SpooledLog[EventWriteSummary] | None = None
        self._wake = asyncio.Event()
        spool = settings.event_spool
        self._replay_batch = spool.replay_batch_events
        if spool.enabled:
            self._spooled = SpooledLog(
                EventSpool.open(
                    settings.event_spool_dir, spool.max_bytes, spool.retry_after_seconds
                ),
                self._write,
                spool.replay_batch_events,
            )
            self._metrics.spool_size(0, spool.max_bytes)
            # Events left by a previous replica in this slot are replayed from the start.
            self._replayer = loop.create_task(
                replay_forever(
                    self._spooled,
                    self._wake,
                    spool.probe_interval_seconds,
                    self._replayed,
                    probe=self._writer.ping,
                )
            )
        self._sampler = loop.create_task(
            self._sample_stream(settings.monitoring.sample_interval_seconds)
        )

    def _replayed(self, step: ReplayStep[EventWriteSummary]) -> None:
        result = step.result or EventWriteSummary(0, 0)
        self._metrics.replayed(result.written, result.duplicates, step.corrupt)
        self._metrics.replayed_clicks(result.clicks, result.attributed)
        if self._spooled is not None:
            spool = self._spooled.spool
            self._metrics.spool_size(spool.size_bytes, spool.max_bytes)
        if step.emptied:
            logger.info("event spool replayed and emptied")

    async def _sample_stream(self, interval: float) -> None:
        """The stream's length and every consumer group's backlog, every `interval` seconds."""
        while True:
            if self._spooled is not None:
                await self._replay_orphans()
                spool = self._spooled.spool  # set again each time: Ray drops idle gauge values
                self._metrics.spool_size(spool.size_bytes, spool.max_bytes)
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

    async def _replay_orphans(self) -> None:
        """Spools left in the directory by replicas that are gone (scaled down) are replayed here."""
        assert self._spooled is not None
        spool = self._spooled.spool
        try:
            await asyncio.to_thread(
                replay_orphans,
                spool.directory,
                spool.slot,
                self._write,
                self._replay_batch,
                self._replayed,
            )
        except Exception as exc:  # the next sample retries
            logger.warning("event spools of departed replicas not replayed: %s", exc)

    def _follow(self, served: ServedVersions) -> None:
        """Serve deltas in the spaces of `served` (the ingress's versions); load new ones in the
        background and drop the vectors of versions no longer served."""
        if served == self._served:
            return
        self._served = served
        wanted = {v for v in served.variants.values() if v is not None} | {served.default}
        loop = asyncio.get_running_loop()
        for version in sorted(v for v in wanted - set(self._embeddings) - set(self._loading) if v):
            self._loading[version] = loop.create_task(self._load(version))
        for version in set(self._embeddings) - wanted:
            del self._embeddings[version]

    async def _load(self, version: str) -> None:
        try:
            self._embeddings[version] = await asyncio.to_thread(
                load_item_embeddings, self._source, version
            )
            logger.info("delta embeddings of version %s loaded", version)
        except Exception as exc:  # retried with the next batch that names it
            logger.warning("item vectors of version %s unavailable: %s", version, exc)
        finally:
            del self._loading[version]

    def _embeddings_for(self, variant: str) -> ItemEmbeddings | None:
        """The item vectors of the variant's version, else of the default version (not loaded yet)."""
        served = self._served  # read once: the event loop may replace it meanwhile
        for version in (served.variants.get(variant), served.default):
            emb = self._embeddings.get(version) if version is not None else None
            if emb is not None:
                return emb
        return None

    def _write(self, events: list[Event]) -> EventWriteSummary:
        # Grouped by the space of the user's variant; a user's events stay in order (one group).
        groups: dict[str, list[int]] = defaultdict(list)
        spaces: dict[str, ItemEmbeddings | None] = {}
        # A user's variant: the space of their delta embedding, and whom a click not attributed
        # to a request is counted for.
        variants = [assign_variant(self._salt, e.user_id, self._weights) for e in events]
        for row, variant in enumerate(variants):
            emb = self._embeddings_for(variant)
            key = emb.model_version if emb is not None else ""
            spaces[key] = emb
            groups[key].append(row)
        applied = [False] * len(events)
        for key, rows in groups.items():
            result = self._writer.write([events[r] for r in rows], spaces[key])
            for row, ok in zip(rows, result.applied, strict=True):
                applied[row] = ok
        new = [e for e, ok in zip(events, applied, strict=True) if ok]
        bucket = [v for v, ok in zip(variants, applied, strict=True) if ok]
        credited: list[str | None] = [None] * len(new)
        try:
            credited = self._log.attribute(
                [(e.request_id, e.user_id, e.event_type.value) for e in new]
            )
        except Exception as exc:  # logged and applied already: attribution is best effort
            logger.warning("attribution unavailable for %d events: %s", len(new), exc)
        clicks: Counter[str] = Counter()
        attributed: Counter[tuple[str, str]] = Counter()
        for event, credit, own in zip(new, credited, bucket, strict=True):
            kind = event.event_type.value
            if kind == "click":
                clicks[credit or own] += 1
            if credit is not None:
                attributed[(credit, kind)] += 1
        return EventWriteSummary(
            written=len(new),
            duplicates=len(events) - len(new),
            clicks=dict(clicks),
            attributed=dict(attributed),
        )

    async def write(
        self, events: Sequence[Event], served: ServedVersions | None = None
    ) -> EventWriteSummary:
        """Log and apply `events` in order, or spool them while Redis is unavailable (or the spool
        still holds older ones); SpoolFull when they do not fit (FeatureStoreUnavailable when Redis
        fails and the spool is disabled). `served`: the versions the caller's router serves."""
        if served is not None and served.default is not None:
            self._follow(served)
        # In a thread: pipelined round trips, and other batches may be written meanwhile.
        if self._spooled is None:
            return await asyncio.to_thread(self._write, list(events))
        outcome = await asyncio.to_thread(self._spooled.write, list(events))
        if outcome.result is not None:
            return outcome.result
        self._wake.set()
        spool = self._spooled.spool
        self._metrics.spooled(outcome.spooled, spool.size_bytes, spool.max_bytes)
        return EventWriteSummary(written=0, duplicates=outcome.duplicates, spooled=outcome.spooled)

    def __del__(self) -> None:
        for name in ("_sampler", "_replayer"):
            task: Any = getattr(self, name, None)
            if task is not None:
                task.cancel()
