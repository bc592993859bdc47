"""Retriever deployment: FAISS search over the bundle's item embeddings, merged with popularity.

Excludes the items the user already interacted with and those the request filters out; light and
cold users get popularity candidates (by category when known). The logic is `recommend.retrieve`.
"""

from __future__ import annotations

import time
from dataclasses import replace

from ray import serve

from serve_app.config import ServeSettings
from serve_app.metrics import RetrievalMetrics, StageMetrics
from serve_app.models import VersionedStage
from serve_app.recommend import Candidates, UserState, retrieve, with_timing


@serve.deployment
class Retriever(VersionedStage):
    def __init__(self, settings: ServeSettings) -> None:
        self._init_models(settings)
        self._metrics = StageMetrics("retriever")
        self._retrieval = RetrievalMetrics()

    async def retrieve(self, user: UserState) -> Candidates:
        model = await self.model(user.query.model_version)
        start = time.perf_counter()
        candidates = retrieve(model, user, self._ranking)
        end = time.perf_counter()
        self._metrics.observe((end - start) * 1000.0)
        self._retrieval.retrieved(
            candidates.n_retrieved,
            candidates.n_collaborative,
            len(candidates.rows) - candidates.n_retrieved - candidates.n_collaborative,
        )
        return replace(candidates, timings=with_timing(candidates.timings, "retriever", start, end))
