"""Re-ranker host: business rules, MMR diversity and the cold-start paths, then the final lists
of a batch; also the retriever's fallback (popularity lists through the same rules).

Loads only item ids, categories, embeddings and popularity (`stages.reranker.ReRankingModel`); the
logic is `stages.reranker.rerank_batch`. Hosted by a group deployment (`ReRanker` alone, `Ranking`,
...) or by the Ingress (`fused`); it does not know which.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from serve_app.chain import FallbackLists
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

# Items per list the Ingress keeps to answer alone (FallbackLists): a page of k <= 200 after filters.
FALLBACK_LIST_LENGTH = 300


class ReRankerHost(VersionedStage[ReRankingModel]):
    """The re-ranker stage and its metrics."""

    name = "reranker"

    def __init__(self, settings: ServeSettings) -> None:
        self._init_models(settings, ReRankingModel.from_directory)
        self.metrics = StageMetrics("reranker")

    async def run(self, scored: list[Scored]) -> list[Recommendations]:
        """The last stage: the final lists of a batch (the chain ends here)."""
        start = time.perf_counter()
        batch = await self.each_version(
            scored, version_of, lambda model, part: rerank_batch(model, part, self._ranking)
        )
        end = time.perf_counter()
        self.metrics.observe((end - start) * 1000.0)
        return [replace(r, timings=with_timing(r.timings, "reranker", start, end)) for r in batch]

    async def item_ids(self, version: str) -> np.ndarray:
        """`version`'s item ids, for the router's answer when this stage is down (ranker order)."""
        return (await self.model(version)).catalog.item_ids

    async def fallback_lists(self, version: str) -> FallbackLists:
        """`version`'s most popular items, globally and per category, a few hundred each: what the
        Ingress answers alone when no stage can (`chain.FallbackLists`)."""
        model = await self.model(version)
        catalog, popularity = model.catalog, model.popularity
        categories = catalog.categories
        top = popularity.global_rows[:FALLBACK_LIST_LENGTH]
        return FallbackLists(
            version=version,
            top=tuple(
                (str(catalog.item_ids[r]), categories[int(catalog.item_categories[r])]) for r in top
            ),
            by_category={
                name: tuple(str(catalog.item_ids[r]) for r in rows[:FALLBACK_LIST_LENGTH])
                for name, rows in popularity.by_category.items()
            },
        )

    async def popular(self, users: list[UserState]) -> list[Recommendations]:
        """The retriever's fallback: popularity lists through the same rules, flagged degraded."""
        start = time.perf_counter()
        batch = await self.each_version(
            users, version_of, lambda model, part: popular_batch(model, part, self._ranking)
        )
        end = time.perf_counter()
        return [replace(r, timings=with_timing(r.timings, "reranker", start, end)) for r in batch]
