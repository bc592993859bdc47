"""ReRanker deployment: business rules, MMR diversity and the cold-start paths, then the final list.

No repeats (seen and duplicate items), the request's filters, a per-category cap, MMR with a
configurable lambda (1 = the ranker's order); unknown users get popularity (`cold_start`), light users a
blend of popularity and retrieval. The logic is `recommend.rerank`.
"""

from __future__ import annotations

import time
from dataclasses import replace

from ray import serve

from serve_app.config import ServeSettings
from serve_app.metrics import StageMetrics
from serve_app.models import VersionedStage
from serve_app.recommend import Recommendations, Scored, rerank, with_timing


@serve.deployment
class ReRanker(VersionedStage):
    def __init__(self, settings: ServeSettings) -> None:
        self._init_models(settings)
        self._metrics = StageMetrics("reranker")

    async def rerank(self, scored: Scored) -> Recommendations:
        model = await self.model(scored.candidates.user.query.model_version)
        start = time.perf_counter()
        result = rerank(model, scored, self._ranking)
        end = time.perf_counter()
        self._metrics.observe((end - start) * 1000.0)
        return replace(result, timings=with_timing(result.timings, "reranker", start, end))
