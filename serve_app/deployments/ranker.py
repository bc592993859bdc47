"""Ranker host: one XGBoost `inplace_predict` over the stacked candidate x feature matrices of a
batch.

Loads only the booster, item features and categories (`stages.ranker.RankingModel`); the logic is
`stages.ranker.score_batch`.
"""

from __future__ import annotations

import time
from dataclasses import replace

from serve_app.config import ServeSettings
from serve_app.metrics import StageMetrics
from serve_app.models import VersionedStage
from serve_app.stages.ranker import RankingModel, score_batch
from serve_app.stages.records import Candidates, Scored, version_of, with_timing


class RankerHost(VersionedStage[RankingModel]):
    """The ranker stage and its metrics (hosted by a group deployment or the Ingress)."""

    name = "ranker"

    def __init__(self, settings: ServeSettings) -> None:
        self._init_models(settings, RankingModel.from_directory)
        self.metrics = StageMetrics("ranker")

    async def run(self, candidates: list[Candidates]) -> list[Scored]:
        """Each list of candidates scored, in order."""
        start = time.perf_counter()
        batch = await self.each_version(
            candidates, version_of, lambda model, part: score_batch(model, part)
        )
        end = time.perf_counter()
        self.metrics.observe((end - start) * 1000.0)
        return [replace(s, timings=with_timing(s.timings, "ranker", start, end)) for s in batch]
