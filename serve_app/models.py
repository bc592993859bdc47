"""Registry watcher of the online graph: resolve the alias to a version, fetch it once, verify, load.

`ModelSource` turns `models:/<name>@<alias>` into loaded `ServingModel`s, one per version (the stages keep
them side by side through Ray Serve model multiplexing, keyed by version). `AliasWatcher` re-resolves the
alias periodically and hot-swaps: the new version becomes current only after `activate` (the router
warming every stage) succeeded, so in-flight requests finish on the version they started with and a
bundle that fails verification is refused while the previous one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import serve

from serve_app.config import RankingConfig, ServeSettings
from serve_app.errors import RecserveError

if TYPE_CHECKING:  # loading needs torch/FAISS/XGBoost; the router only resolves aliases
    from serve_app.recommend import ServingModel

logger = logging.getLogger(__name__)

# Versions one replica keeps loaded: two A/B arms, a shadow, and the next one during a swap.
MAX_VERSIONS_PER_REPLICA = 4


@dataclass(frozen=True)
class ModelSource:
    """Where bundles come from (an MLflow registry) and where their verified copies are cached."""

    tracking_uri: str
    model_name: str
    alias: str
    cache_dir: Path

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> ModelSource:
        return cls(
            tracking_uri=settings.tracking_uri,
            model_name=settings.models.model_name,
            alias=settings.models.alias,
            cache_dir=settings.bundle_cache_dir,
        )

    def resolve(self, ref: str | None = None) -> str:
        """The version `ref` (an alias or a version number; default: the configured alias) names
        now (ModelUnavailable if none)."""
        from serve_app.bundle import resolve_ref

        return resolve_ref(self.tracking_uri, self.model_name, ref or self.alias)

    def fetch(self, version: str) -> Path:
        """A verified local copy of `version` (downloaded at most once per cache directory)."""
        from serve_app.bundle import fetch_bundle

        return fetch_bundle(self.tracking_uri, self.model_name, version, self.cache_dir)

    def load(self, version: str) -> ServingModel:
        """Fetch, verify, load and check `version` against the serving contract, then warm it."""
        from serve_app.bundle import load_bundle
        from serve_app.recommend import ServingModel

        model = ServingModel.from_bundle(load_bundle(self.fetch(version)), version=version)
        model.warm()
        return model


@dataclass(frozen=True)
class SwapOutcome:
    """Result of one alias check."""

    previous: str | None
    current: str | None
    changed: bool
    error: str | None = None


@dataclass
class AliasWatcher:
    """Polls `resolve()` and makes a new version current once `activate(version)` succeeded.

    A version whose activation failed (verification, incompatible bundle, a stage that could not
    load it) is remembered as refused and not retried until the alias moves or `check(force=True)`.
    """

    resolve: Callable[[], str]
    activate: Callable[[str], Awaitable[None]]
    interval_seconds: float
    current: str | None = None
    refused: dict[str, str] = field(default_factory=dict)
    last_error: str | None = None
    last_check: float | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def check(self, force: bool = False) -> SwapOutcome:
        """Resolve the alias once and swap if it moved; never raises."""
        async with self._lock:
            previous = self.current
            self.last_check = time.time()
            try:
                version = await asyncio.to_thread(self.resolve)
            except RecserveError as exc:
                self.last_error = exc.message
                logger.warning("alias check failed, keeping %s: %s", previous, exc.message)
                return SwapOutcome(previous, previous, False, exc.message)
            except Exception as exc:  # a registry outage must not stop the watcher
                self.last_error = f"registry unreachable: {exc}"
                logger.warning("alias check failed, keeping %s: %s", previous, exc)
                return SwapOutcome(previous, previous, False, self.last_error)
            if version == previous:
                self.last_error = None
                return SwapOutcome(previous, previous, False)
            if version in self.refused and not force:
                return SwapOutcome(previous, previous, False, self.refused[version])
            try:
                await self.activate(version)
            except Exception as exc:
                message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                self.refused[version] = message
                self.last_error = f"version {version} refused: {message}"
                logger.error("version %s refused, still serving %s: %s", version, previous, message)
                return SwapOutcome(previous, previous, False, self.last_error)
            self.refused.pop(version, None)
            self.current = version
            self.last_error = None
            logger.info("now serving version %s (was %s)", version, previous)
            return SwapOutcome(previous, version, True)

    async def run(self) -> None:
        """Check now, then every `interval_seconds`, until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(self.interval_seconds)


class VersionedStage:
    """Mixin of the stages that serve bundles: the alias's version is loaded and warmed in the
    constructor; other versions load on first use. Multiplexed by version (Ray Serve routes a
    request to a replica that holds its version and evicts the least recently used beyond
    MAX_VERSIONS_PER_REPLICA). Also holds the runtime-tunable ranking knobs (`user_config`)."""

    _settings: ServeSettings
    _source: ModelSource
    _preloaded: dict[str, ServingModel]
    _ranking: RankingConfig

    def _init_models(self, settings: ServeSettings) -> None:
        from serve_app.recommend import limit_threads

        limit_threads()
        self._settings = settings
        self._ranking = settings.ranking
        self._source = ModelSource.from_settings(settings)
        self._preloaded = {}
        # Every A/B arm and the shadow, loaded and warmed now.
        for ref in settings.experiment.served_refs(settings.models.alias):
            try:
                version = self._source.resolve(ref)
                if version not in self._preloaded:
                    self._preloaded[version] = self._source.load(version)
            except RecserveError as exc:
                # Start without it: the router activates a version once it can be loaded.
                logger.warning("no bundle for %s at start (%s)", ref, exc.message)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Ray Serve `user_config`: overrides of RankingConfig fields, applied without restart."""
        base = self._settings.ranking.model_dump()
        self._ranking = RankingConfig.model_validate({**base, **(user_config or {})})

    @serve.multiplexed(max_num_models_per_replica=MAX_VERSIONS_PER_REPLICA)
    async def model(self, version: str) -> ServingModel:
        model = self._preloaded.pop(version, None)
        if model is None:
            # In a thread: loading takes a while and requests on the current version go on.
            model = await asyncio.to_thread(self._source.load, version)
        return model

    async def warm(self) -> str:
        """Load the request's multiplexed version (the router calls this before a swap)."""
        version = serve.get_multiplexed_model_id()
        await self.model(version)
        return version
