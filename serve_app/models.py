"""Registry watcher of the online graph: resolve the alias to a version, fetch it once, verify, load.

`ModelSource` turns `models:/<name>@<alias>` into verified bundle directories and loaded `ServingModel`s;
`VersionedStage` keeps each stage's own part of several versions side by side, keyed by version, and
downloads what is not cached through `ChildProcessModelSource` (MLflow in a child process, never
in a stage replica). `AliasWatcher` re-resolves the alias periodically and hot-swaps: the new version becomes
current only after `activate` (the router warming every stage) succeeded, so in-flight requests
finish on the version they started with and a bundle that fails verification is refused while the
previous one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from serve_app.config import RankingConfig, ServeSettings, StageConfig
from serve_app.errors import RecserveError, StageUnavailable
from serve_app.registry_process import RegistryProcess
from serve_app.schemas import BundleManifest
from serve_app.stages.records import by_version

if TYPE_CHECKING:  # loading needs FAISS/XGBoost; the router only resolves aliases
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
    # Serve versions without a pinned manifest digest (models.allow_untagged; bundle.py).
    allow_untagged: bool = False

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> ModelSource:
        return cls(
            tracking_uri=settings.tracking_uri,
            model_name=settings.models.model_name,
            alias=settings.models.alias,
            cache_dir=settings.bundle_cache_dir,
            allow_untagged=settings.models.allow_untagged,
        )

    def resolve(self, ref: str | None = None) -> str:
        """The version `ref` (an alias or a version number; default: the configured alias) names
        now (ModelUnavailable if none)."""
        from serve_app.bundle import resolve_ref

        return resolve_ref(self.tracking_uri, self.model_name, ref or self.alias)

    def fetch(self, version: str) -> Path:
        """A verified local copy of `version` (downloaded at most once per cache directory, its
        manifest checked against the registry's digest then)."""
        from serve_app.bundle import fetch_bundle

        return fetch_bundle(
            self.tracking_uri,
            self.model_name,
            version,
            self.cache_dir,
            allow_untagged=self.allow_untagged,
        )

    def serving_hint(self) -> list[str]:
        """The versions the router last said it serves that are in this node's cache (no MLflow)."""
        from serve_app.bundle import read_serving_hint

        return read_serving_hint(self.model_name, self.cache_dir)

    def note_serving(self, versions: Iterable[str]) -> None:
        from serve_app.bundle import write_serving_hint

        write_serving_hint(self.model_name, versions, self.cache_dir)

    def load(self, version: str) -> ServingModel:
        """Fetch, verify, load and check `version` against the serving contract, then warm it."""
        from serve_app.bundle import load_bundle
        from serve_app.recommend import ServingModel

        model = ServingModel.from_bundle(load_bundle(self.fetch(version)), version=version)
        model.warm()
        return model


@dataclass(frozen=True)
class ChildProcessModelSource(ModelSource):
    """The stage replicas' `ModelSource`: a bundle not yet cached is downloaded in a short-lived
    child process, so they never import MLflow (they never resolve a ref: the router names the
    version). A cache hit is verified here and spawns no child."""

    registry: RegistryProcess = field(default_factory=RegistryProcess)

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> ChildProcessModelSource:
        source = ModelSource.from_settings(settings)
        registry = RegistryProcess(settings.models.registry_process_timeout_seconds)
        return cls(**vars(source), registry=registry)

    def fetch(self, version: str) -> Path:
        from serve_app.bundle import cached_bundle, verify_bundle

        cached = cached_bundle(self.model_name, version, self.cache_dir)
        if cached is not None:
            return cached
        path = self.registry.fetch(
            self.tracking_uri,
            self.model_name,
            version,
            self.cache_dir,
            allow_untagged=self.allow_untagged,
        )
        verify_bundle(path)  # what this process serves, it checked itself
        return path


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
    load it) is remembered as refused and not retried until the alias moves or `check(force=True)`;
    one deferred because a stage had no live replica (StageUnavailable) is tried again next check.
    """

    resolve: Callable[[], str]
    activate: Callable[[str], Awaitable[None]]
    interval_seconds: float
    current: str | None = None
    refused: dict[str, str] = field(default_factory=dict)
    last_error: str | None = None
    last_check: float | None = None
    # Set once the first check has finished, whatever its outcome (`Router.first_checks`).
    checked: asyncio.Event = field(default_factory=asyncio.Event)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def check(self, force: bool = False) -> SwapOutcome:
        """Resolve the alias once and swap if it moved; never raises."""
        try:
            return await self._check(force)
        finally:
            self.checked.set()

    async def _check(self, force: bool) -> SwapOutcome:
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
            except StageUnavailable as exc:  # a replica restarting: try again at the next check
                self.last_error = f"version {version} deferred: {exc.message}"
                logger.warning("version %s deferred, still serving %s: %s", version, previous, exc)
                return SwapOutcome(previous, previous, False, self.last_error)
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


class StageModel(Protocol):
    """What a stage serves from: one version's artifacts (`serve_app.stages.*Model`)."""

    @property
    def version(self) -> str: ...

    def warm(self) -> None: ...


M = TypeVar("M", bound=StageModel)
In = TypeVar("In")
Out = TypeVar("Out")


class VersionedStage(Generic[M]):
    """Base of the stage hosts (`serve_app.deployments`): the versions a stage serves, side by side.

    A stage never resolves a ref: the router names the version of every request and has each stage
    `warm` a version before it serves it. The constructor loads and warms (only this stage's
    artifacts: `load(directory, version)`) the versions the router last recorded as served that are
    in this node's bundle cache (`ModelSource.serving_hint`), so a restarted or added replica is
    warm before its first request without a registry call; any other version loads on first use, in
    a thread, once however many batches ask for it (a bundle not cached is downloaded by
    `ChildProcessModelSource`, so the replica never imports MLflow), and the least recently used
    beyond MAX_VERSIONS_PER_REPLICA is dropped. A batch may mix versions: `each_version` splits it
    and answers in order. The hosting deployment's `user_config` (a `StageConfig`) reaches each of
    its stages through `_configure` (ranking overrides; the batching is the deployment's).
    """

    _settings: ServeSettings
    _source: ModelSource
    _models: OrderedDict[str, M]
    _loading: dict[str, asyncio.Task[M]]
    _ranking: RankingConfig
    _config: StageConfig

    def _init_models(
        self, settings: ServeSettings, load: Callable[[Path, str, BundleManifest], M]
    ) -> None:
        self._settings = settings
        self._ranking = settings.ranking
        self._config = StageConfig()
        self._source = ChildProcessModelSource.from_settings(settings)
        self._load = load
        self._models = OrderedDict()
        self._loading = {}
        # The versions served now, from the cache (none at the graph's first start: the router's
        # warm loads them), so that a replica started later is warm before its first request.
        for version in self._source.serving_hint()[:MAX_VERSIONS_PER_REPLICA]:
            try:
                self._models[version] = self._load_version(version)
            except RecserveError as exc:
                logger.warning("cached version %s not loaded at start (%s)", version, exc.message)

    def _load_version(self, version: str) -> M:
        from serve_app.bundle import read_manifest

        path = self._source.fetch(version)  # verified against the manifest's checksums
        model = self._load(path, version, read_manifest(path))
        model.warm()
        return model

    def _configure(self, user_config: dict[str, Any] | None) -> StageConfig:
        """Validate a `user_config` (a bad one raises: Serve keeps the previous config)."""
        config = StageConfig.model_validate(user_config or {})
        base = self._settings.ranking.model_dump()
        self._ranking = RankingConfig.model_validate({**base, **config.ranking})
        self._config = config
        return config

    async def model(self, version: str) -> M:
        model = self._models.get(version)
        if model is not None:
            self._models.move_to_end(version)
            return model
        task = self._loading.get(version)
        if task is None:
            # In a thread: loading takes a while and batches of the loaded versions go on.
            task = asyncio.ensure_future(asyncio.to_thread(self._load_version, version))
            self._loading[version] = task
            task.add_done_callback(lambda _: self._loading.pop(version, None))
        model = await asyncio.shield(task)
        self._models[version] = model
        self._models.move_to_end(version)
        while len(self._models) > MAX_VERSIONS_PER_REPLICA:
            evicted, _ = self._models.popitem(last=False)
            logger.info("version %s unloaded (least recently used)", evicted)
        return model

    async def each_version(
        self,
        batch: Sequence[In],
        version: Callable[[In], str],
        run: Callable[[M, list[In]], list[Out]],
    ) -> list[Out]:
        """`run` once per version present in `batch`, results back in the batch's order."""
        out: list[Out | None] = [None] * len(batch)
        for name, positions in by_version(batch, version).items():
            model = await self.model(name)
            for position, result in zip(
                positions, run(model, [batch[p] for p in positions]), strict=True
            ):
                out[position] = result
        return out  # type: ignore[return-value]  # every position was filled

    async def warm(self, version: str) -> str:
        """Load `version` here (the router calls this on every stage before a swap)."""
        await self.model(version)
        return version
