"""Router deployment: binds each request to a bundle version and runs the stages, response to response.

Single variant for now (the A/B split and the shadow mirror come with the experiments issue): the
version is the alias's, polled by an `AliasWatcher`; a new version is served only after every stage has
loaded it (`warm`), so a swap never fails an in-flight request and a bad bundle is refused while the
previous version keeps serving. Handles are kept per version: two versions can serve side by side.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import ServeSettings
from serve_app.errors import ModelUnavailable
from serve_app.metrics import ModelMetrics, StageMetrics
from serve_app.models import AliasWatcher, ModelSource, SwapOutcome
from serve_app.recommend import Query, Recommendations, stamp, with_timing

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageHandles:
    """The four stage handles bound to one bundle version (multiplexed model id)."""

    user_tower: DeploymentHandle
    retriever: DeploymentHandle
    ranker: DeploymentHandle
    reranker: DeploymentHandle

    def named(self) -> dict[str, DeploymentHandle]:
        return {
            "user_tower": self.user_tower,
            "retriever": self.retriever,
            "ranker": self.ranker,
            "reranker": self.reranker,
        }


@dataclass(frozen=True)
class Readiness:
    """What /readyz reports: ready once every stage has loaded the served version."""

    ready: bool
    model_version: str | None
    model_uri: str
    last_check: float | None
    error: str | None
    refused: dict[str, str] = field(default_factory=dict)


def root_cause(exc: BaseException) -> BaseException:
    """The exception a remote stage raised (Ray wraps it in a RayTaskError with `.cause`)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def describe(exc: BaseException) -> str:
    cause = root_cause(exc)
    message = getattr(cause, "message", None)
    return str(message) if message else f"{type(cause).__name__}: {cause}"


@serve.deployment
class Router:
    def __init__(
        self,
        settings: ServeSettings,
        user_tower: DeploymentHandle,
        retriever: DeploymentHandle,
        ranker: DeploymentHandle,
        reranker: DeploymentHandle,
    ) -> None:
        self._settings = settings
        self._stages = StageHandles(user_tower, retriever, ranker, reranker)
        self._bound: dict[str, StageHandles] = {}
        self._variant = settings.api.variant
        self._source = ModelSource.from_settings(settings)
        self._metrics = ModelMetrics(self._variant)
        self._graph = StageMetrics("graph")
        self._watcher = AliasWatcher(
            resolve=self._source.resolve,
            activate=self._activate,
            interval_seconds=settings.models.poll_interval_seconds,
        )
        # The replica's event loop runs the constructor: the watcher lives as long as the replica.
        self._task = asyncio.get_running_loop().create_task(self._watcher.run())
        self._keeper = asyncio.get_running_loop().create_task(
            self._refresh_metrics(settings.monitoring.sample_interval_seconds)
        )

    async def _refresh_metrics(self, interval: float) -> None:
        # Ray forgets gauge values not set for two export intervals: set them again.
        while True:
            self._metrics.refresh()
            await asyncio.sleep(interval)

    def _bind(self, version: str) -> StageHandles:
        bound = self._bound.get(version)
        if bound is None:
            bound = StageHandles(
                **{
                    name: handle.options(multiplexed_model_id=version)
                    for name, handle in self._stages.named().items()
                }
            )
            self._bound[version] = bound
        return bound

    async def _activate(self, version: str) -> None:
        """Have every stage load `version`; raise (refusing it) if any stage cannot."""
        stages = self._bind(version).named()
        calls = {name: handle.warm.remote() for name, handle in stages.items()}
        results = await asyncio.wait_for(
            asyncio.gather(*calls.values(), return_exceptions=True),
            timeout=self._settings.models.warm_timeout_seconds,
        )
        failures = [
            f"{name}: {describe(result)}"
            for name, result in zip(calls, results, strict=True)
            if isinstance(result, BaseException)
        ]
        if failures:
            self._metrics.refused_version()
            self._bound.pop(version, None)
            raise ModelUnavailable("; ".join(failures))
        self._metrics.swapped(self._watcher.current, version)

    async def recommend(self, query: Query) -> Recommendations:
        version = self._watcher.current
        if version is None:
            raise ModelUnavailable(
                f"no version of {self._settings.models.uri} is loaded yet"
                + (f" ({self._watcher.last_error})" if self._watcher.last_error else "")
            )
        stages = self._bind(version)
        start = time.perf_counter()
        # Each response goes straight into the next call: Serve hands the value over between the
        # stages' replicas; only the final result comes back here.
        user = stages.user_tower.embed.remote(stamp(query, version, self._variant))
        candidates = stages.retriever.retrieve.remote(user)
        scored = stages.ranker.rank.remote(candidates)
        result: Recommendations = await stages.reranker.rerank.remote(scored)
        end = time.perf_counter()
        self._graph.observe((end - start) * 1000.0)
        return replace(result, timings=with_timing(result.timings, "graph", start, end))

    async def readiness(self) -> Readiness:
        watcher = self._watcher
        return Readiness(
            ready=watcher.current is not None,
            model_version=watcher.current,
            model_uri=self._settings.models.uri,
            last_check=watcher.last_check,
            error=watcher.last_error,
            refused=dict(watcher.refused),
        )

    async def reload(self) -> SwapOutcome:
        """Re-resolve the alias now (admin), retrying a previously refused version."""
        return await self._watcher.check(force=True)

    def __del__(self) -> None:
        for name in ("_task", "_keeper"):
            task: Any = getattr(self, name, None)
            if task is not None:
                task.cancel()
