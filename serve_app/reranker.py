"""ReRanker deployment: business rules, MMR diversity and the cold-start paths, then the final lists
of a batch.

Loads only item ids, categories, embeddings and popularity (`stages.reranker.ReRankingModel`); the
logic is `stages.reranker.rerank_batch`.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
from ray import serve

from serve_app.config import ServeSettings
from serve_app.metrics import StageMetrics
from serve_app.models import VersionedStage
from serve_app.stages.records import (
    Recommendations,
    Scored,
    UserState,
    version_of,
    with_timing,
)
from serve_app.stages.reranker import ReRankingModel, popular_batch, rerank_batch


@serve.deployment
class ReRanker(VersionedStage[ReRankingModel]):
    def __init__(self, settings: ServeSettings) -> None:
        self._init_models(settings, ReRankingModel.from_directory)
        self._metrics = StageMetrics("reranker")
        self._init_batching(self._rerank, self._metrics)

    async def rerank(self, scored: list[Scored]) -> list[Recommendations]:
        """The last stage: the final lists of a batch (the graph's chain ends here)."""
        return await self._submit(scored)

    async def _rerank(self, scored: list[Scored]) -> list[Recommendations]:
        start = time.perf_counter()
        batch = await self.each_version(
            scored, version_of, lambda model, part: rerank_batch(model, part, self._ranking)
        )
        end = time.perf_counter()
        self._metrics.observe((end - start) * 1000.0)
        return [replace(r, timings=with_timing(r.timings, "reranker", start, end)) for r in batch]

    async def item_ids(self, version: str) -> np.ndarray:
        """`version`'s item ids, for the router's answer when this stage is down (ranker order)."""
        return (await self.model(version)).catalog.item_ids

    async def popular(self, users: list[UserState]) -> list[Recommendations]:
        """The Retriever's fallback (the router calls it when the Retriever fails): popularity
        lists through the same rules, flagged degraded. Not batched: it runs only while the
        Retriever is down."""
        start = time.perf_counter()
        batch = await self.each_version(
            users, version_of, lambda model, part: popular_batch(model, part, self._ranking)
        )
        end = time.perf_counter()
        return [replace(r, timings=with_timing(r.timings, "reranker", start, end)) for r in batch]
