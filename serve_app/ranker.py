"""Ranker deployment: XGBoost `inplace_predict` over the candidate x feature matrix.

The matrix is `serve_app.contract.ranker_features` (the training code path): retrieval score and rank,
the bundle's in-memory item features, and the user's category affinity and recent-history features read
by the user tower (Feast batch view + real-time hash). The logic is `recommend.score`.
"""

from __future__ import annotations

import time

from ray import serve

from serve_app.config import ServeSettings
from serve_app.metrics import StageMetrics
from serve_app.models import VersionedStage
from serve_app.recommend import Candidates, Scored, score, with_timing


@serve.deployment
class Ranker(VersionedStage):
    def __init__(self, settings: ServeSettings) -> None:
        self._init_models(settings)
        self._metrics = StageMetrics("ranker")

    async def rank(self, candidates: Candidates) -> Scored:
        model = await self.model(candidates.user.query.model_version)
        start = time.perf_counter()
        scored = score(model, candidates)
        end = time.perf_counter()
        self._metrics.observe((end - start) * 1000.0)
        return Scored(
            scored.candidates, scored.scores, with_timing(scored.timings, "ranker", start, end)
        )
