"""Stage groups: 1..4 consecutive stages hosted together, as a Ray Serve deployment or in the Ingress.

`GroupHost` holds one host per stage (serve_app/deployments/{user_tower,retriever,ranker,reranker}.py)
and runs a batch through them as plain function calls, each under its stage's deadline, with the
same timings, metrics and fallbacks as across a hop (`serve_app.chain.advance`). `StageGroup` is the
one deployment class of every group (`StageGroup.options(name=...)`: `UserTower`, `Retrieval`,
`Pipeline`, ... from serve_app/placement.py): it merges the calls that reach it while busy into one
batch (one Feast read, one FAISS search, one XGBoost call per batch). The Router (in the Ingress)
calls a group through `RemoteGroup` (one handle hop) or `LocalGroup` (the `fused` placement: the
stages in the Ingress replica itself, no hop).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.batching import Batcher
from serve_app.chain import FallbackLists, Progress, advance, ranker_order
from serve_app.config import ServeSettings, StageConfig
from serve_app.errors import BadRequest, StageUnavailable
from serve_app.metrics import StageMetrics
from serve_app.placement import Group
from serve_app.stages.records import Recommendations, Scored, UserState, version_of

logger = logging.getLogger(__name__)


class StageHost(Protocol):
    """What a group needs of a stage host (serve_app/deployments/<stage>.py)."""

    name: str
    metrics: StageMetrics

    def run(self, batch: list[Any]) -> Awaitable[list[Any]]: ...

    def warm(self, version: str) -> Awaitable[str]: ...

    def _configure(self, user_config: dict[str, Any] | None) -> StageConfig: ...


def make_host(stage: str, settings: ServeSettings) -> StageHost:
    """The host of `stage`; imported here so that a group loads only its own stages' libraries."""
    if stage == "user_tower":
        from serve_app.deployments.user_tower import UserTowerHost

        return UserTowerHost(settings)
    if stage == "retriever":
        from serve_app.deployments.retriever import RetrieverHost

        return RetrieverHost(settings)
    if stage == "ranker":
        from serve_app.deployments.ranker import RankerHost

        return RankerHost(settings)
    from serve_app.deployments.reranker import ReRankerHost

    return ReRankerHost(settings)


class GroupHost:
    """Consecutive stages as function calls: `run(progress)` takes a batch from where it stands in
    the chain through every stage held here. A stage that raises or misses its deadline is
    answered around inside the group (`chain.advance`), counted per stage and cause in
    recserve_stage_errors_total, as the router counts a stage it reaches through a hop. A deadline
    here cuts a stage only while it waits (loading a version): its own work is synchronous."""

    def __init__(self, settings: ServeSettings, stages: Sequence[str]) -> None:
        self._settings = settings
        self._stages = tuple(stages)
        self._hosts = {stage: make_host(stage, settings) for stage in self._stages}

    @property
    def stages(self) -> tuple[str, ...]:
        return self._stages

    async def run(self, progress: Progress) -> Progress:
        """`progress` through this group's stages."""
        return await advance(progress, self._stages, self._call, self)

    async def _call(self, name: str, batch: list[Any]) -> list[Any] | None:
        host = self._hosts["reranker" if name == "popular" else name]
        work: Awaitable[list[Any]] = (
            self._reranker().popular(batch) if name == "popular" else host.run(batch)
        )
        try:
            return await asyncio.wait_for(work, getattr(self._settings.deadlines, host.name))
        except TimeoutError:
            cause = "timeout"
        except BadRequest:
            raise  # the request's own fault: no fallback makes it right
        except Exception as exc:
            cause = "error"
            logger.warning("stage %s failed: %s", host.name, exc)
        host.metrics.failed(cause, len(batch))
        return None

    def _reranker(self) -> Any:
        host = self._hosts.get("reranker")
        if host is None:
            raise StageUnavailable("reranker")
        return host

    # --- chain.Fallbacks ----------------------------------------------------------------------

    async def popular(self, users: list[UserState]) -> list[Recommendations]:
        # Neither the retriever nor the re-ranker's popular answered: the router answers from the
        # Ingress's own lists (the whole group counts as failed there).
        raise StageUnavailable("retriever")

    async def ranker_order(self, scored: list[Scored]) -> list[Recommendations]:
        reranker = self._reranker()
        return [ranker_order(s, await reranker.item_ids(version_of(s))) for s in scored]

    # --- what the router asks of a group ------------------------------------------------------

    async def warm(self, version: str) -> str:
        """Load `version` in every stage here (the router calls this before a swap)."""
        for host in self._hosts.values():
            await host.warm(version)
        return version

    async def ping(self) -> bool:
        """The router's probe of a group it skips (dead or late): answering is the whole test."""
        return True

    async def item_ids(self, version: str) -> np.ndarray:
        ids: np.ndarray = await self._reranker().item_ids(version)
        return ids

    async def fallback_lists(self, version: str) -> FallbackLists:
        lists: FallbackLists = await self._reranker().fallback_lists(version)
        return lists

    def configure(self, user_config: dict[str, Any] | None) -> StageConfig:
        """Validate a `user_config` (a bad one raises) and give its ranking overrides to every
        stage here."""
        config = StageConfig.model_validate(user_config or {})
        for host in self._hosts.values():
            host._configure(user_config)
        return config

    def observe_batch(self, size: int) -> None:
        for host in self._hosts.values():
            host.metrics.observe_batch(size)

    def close(self) -> None:
        for host in self._hosts.values():
            close = getattr(host, "close", None)
            if close is not None:
                close()


@serve.deployment
class StageGroup(GroupHost):
    """Every stage group's deployment: the calls that reach a replica while it is busy are merged
    into one batch of at most `batching.max_batch_size` requests (its `user_config`, a
    StageConfig), per point of the chain they stand at."""

    def __init__(self, settings: ServeSettings, stages: Sequence[str]) -> None:
        super().__init__(settings, stages)
        self._batcher: Batcher[Progress, Progress] = Batcher(
            self._run_calls,
            StageConfig().batching,
            size=lambda p: len(p.batch),
            on_batch=self.observe_batch,
            name="+".join(self.stages),
        )

    async def run(self, progress: Progress) -> Progress:
        if not progress.batch:
            return progress
        return await self._batcher.submit(progress)

    async def _run_calls(self, calls: list[Progress]) -> list[Progress]:
        points: dict[tuple[int, bool], list[int]] = {}
        for position, call in enumerate(calls):
            points.setdefault((call.at, call.popular), []).append(position)
        out: list[Progress | None] = [None] * len(calls)
        for (at, popular), positions in points.items():
            merged = Progress(at, [r for p in positions for r in calls[p].batch], popular)
            result = await GroupHost.run(self, merged)
            start = 0
            for p in positions:
                n = len(calls[p].batch)
                out[p] = Progress(result.at, result.batch[start : start + n], result.popular)
                start += n
        return out  # type: ignore[return-value]  # every position was filled

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Ray Serve `user_config` (a `StageConfig`), applied without a restart."""
        self._batcher.configure(self.configure(user_config).batching)

    def __del__(self) -> None:
        self.close()
        batcher = getattr(self, "_batcher", None)
        if batcher is not None:
            batcher.close()


# --- how the router calls a group -----------------------------------------------------------------


class GroupClient(Protocol):
    """The router's view of one group, wherever it runs."""

    group: Group

    def run(self, progress: Progress) -> Awaitable[Progress]: ...

    async def warm(self, version: str, timeout: float) -> list[Any]: ...

    async def ping(self) -> bool: ...

    async def item_ids(self, version: str) -> np.ndarray: ...

    async def fallback_lists(self, version: str) -> FallbackLists: ...

    def configure(self, user_config: dict[str, Any] | None) -> None: ...


class RemoteGroup:
    """A group deployment behind one handle hop."""

    def __init__(self, group: Group, handle: DeploymentHandle) -> None:
        self.group = group
        self._handle = handle

    def run(self, progress: Progress) -> Awaitable[Progress]:
        response: Awaitable[Progress] = self._handle.run.remote(progress)
        return response

    async def warm(self, version: str, timeout: float) -> list[Any]:
        """Every live replica's answer (or exception). One call first: it waits for a replica, as
        a group still starting has none and a broadcast fails at once; then every live replica."""
        first = await asyncio.wait_for(self._handle.warm.remote(version), timeout)
        results: list[Any] = await self._handle.broadcast("warm", version).results_async(
            timeout_s=timeout, return_exceptions=True
        )
        return [first, *results]

    async def ping(self) -> bool:
        return bool(await self._handle.ping.remote())

    async def item_ids(self, version: str) -> np.ndarray:
        ids: np.ndarray = await self._handle.item_ids.remote(version)
        return ids

    async def fallback_lists(self, version: str) -> FallbackLists:
        lists: FallbackLists = await self._handle.fallback_lists.remote(version)
        return lists

    def configure(self, user_config: dict[str, Any] | None) -> None:
        """A deployment has its own `user_config`."""


class LocalGroup:
    """A group in the Ingress replica itself (the `fused` placement): no hop, no batcher of its own
    (the router's batch is the batch)."""

    def __init__(self, group: Group, host: GroupHost) -> None:
        self.group = group
        self._host = host

    def run(self, progress: Progress) -> Awaitable[Progress]:
        if progress.batch:
            self._host.observe_batch(len(progress.batch))
        return self._host.run(progress)

    async def warm(self, version: str, timeout: float) -> list[Any]:
        return [await asyncio.wait_for(self._host.warm(version), timeout)]

    async def ping(self) -> bool:
        return await self._host.ping()

    async def item_ids(self, version: str) -> np.ndarray:
        return await self._host.item_ids(version)

    async def fallback_lists(self, version: str) -> FallbackLists:
        return await self._host.fallback_lists(version)

    def configure(self, user_config: dict[str, Any] | None) -> None:
        """The Ingress's `user_config` ranking overrides reach the stages it hosts."""
        self._host.configure(user_config)
