"""Retriever host: FAISS search over the bundle's item embeddings, merged with collaborative and
popularity candidates; one search per batch over its query matrix.

Loads only the index, item embeddings, collaborative arrays, categories and popularity
(`stages.retriever.RetrievalModel`); the logic is `stages.retriever.retrieve_batch`.
"""

from __future__ import annotations

import time
from dataclasses import replace

from serve_app.config import ServeSettings
from serve_app.metrics import RetrievalMetrics, StageMetrics
from serve_app.models import VersionedStage
from serve_app.stages.records import (
    Candidates,
    UserState,
    version_of,
    with_timing,
)
from serve_app.stages.retriever import RetrievalModel, retrieve_batch


class RetrieverHost(VersionedStage[RetrievalModel]):
    """The retriever stage and its metrics (hosted by a group deployment or the Ingress)."""

    name = "retriever"

    def __init__(self, settings: ServeSettings) -> None:
        import faiss

        faiss.omp_set_num_threads(1)  # small batches only lose to thread hand-offs
        self._init_models(settings, RetrievalModel.from_directory)
        self.metrics = StageMetrics("retriever")
        self._retrieval = RetrievalMetrics()

    async def run(self, users: list[UserState]) -> list[Candidates]:
        """Each user's candidates, in order."""
        start = time.perf_counter()
        batch = await self.each_version(
            users, version_of, lambda model, part: retrieve_batch(model, part, self._ranking)
        )
        end = time.perf_counter()
        self.metrics.observe((end - start) * 1000.0)
        for c in batch:
            self._retrieval.retrieved(c.n_retrieved, c.n_collaborative, c.n_popularity)
        return [replace(c, timings=with_timing(c.timings, "retriever", start, end)) for c in batch]
