"""The peer of the graph: the same HTTP API and the same functions in one process, no Ray.

What a user would run instead of a Ray Serve graph: `serve_app.ingress.create_api` (the very
validation, error shapes and JSON) over a backend that reads the UserTower's features (Feast + the
real-time hashes) and chains the four stages in process (`serve_app.recommend.recommend_in_process`),
one request at a time. Served by plain uvicorn with N workers:

    PEER_DATA_DIR=/tmp/demo PEER_REDIS_URL=redis://127.0.0.1:6379/0 \\
        uvicorn bench.peer_app:app --workers 2 --port 8100

(`bench/graph_vs_inprocess.py` starts it so, side by side with the graph.)
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI

from serve_app.config import ServeSettings
from serve_app.deployments.user_tower import UserFeatureSource
from serve_app.errors import ModelUnavailable
from serve_app.event_writer import EventWriteSummary
from serve_app.ingress import create_api
from serve_app.models import ModelSource, SwapOutcome
from serve_app.recommend import ServingModel, limit_threads, recommend_in_process
from serve_app.router import Readiness
from serve_app.schemas import Event
from serve_app.stages.records import Query, Recommendations, stamp


class InProcessBackend:
    """`serve_app.ingress.Backend` with every stage in this process."""

    def __init__(self, settings: ServeSettings) -> None:
        limit_threads()
        self._settings = settings
        source = ModelSource.from_settings(settings)
        self._version = source.resolve()
        self._model: ServingModel = source.load(self._version)
        self._features = UserFeatureSource.from_settings(settings)

    async def recommend(self, query: Query) -> Recommendations:
        query = stamp(query, self._version, "champion")
        features, seen = self._features.read(self._model.tower, [query.user_id])
        (result,) = recommend_in_process(
            self._model, [query], features, seen, self._settings.ranking
        )
        return result

    async def write_events(self, events: list[Event]) -> EventWriteSummary:
        raise ModelUnavailable("the peer serves recommendations only")

    async def readiness(self) -> Readiness:
        return Readiness(True, self._version, self._settings.models.uri, None, None)

    async def reload(self) -> SwapOutcome:
        return SwapOutcome(self._version, self._version, False)

    async def experiments(self) -> dict[str, Any]:
        return {}


def create_app() -> FastAPI:
    settings = ServeSettings(
        feature_store={"data_dir": os.environ["PEER_DATA_DIR"], "profile": "embedded"},
        redis_url=os.environ["PEER_REDIS_URL"],
    )
    return create_api(InProcessBackend(settings), settings.api)


app = create_app() if "PEER_DATA_DIR" in os.environ else None
