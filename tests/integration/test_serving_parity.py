"""Offline/online parity: the serving pipeline, fed from the Feast online store, reproduces the offline
evaluation's ranking for the same users (same candidates, same order) with MMR off and no rules: in
process, and served over HTTP by the graph under every placement (split, two-tier, fused).

The offline side is computed with the training code on the event log (`user_states_at`, `encode_users`,
`ranking_inputs` with the bundle's collaborative models, `rerank`: what `training.pipeline`'s evaluate
stage runs); the
online side reads the registered bundle from MLflow (cache + verification) and the materialized
`user_profile` rows through the same readers the UserTower deployment uses.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pandas as pd
import pytest

from serve_app.config import RankingConfig, ServeSettings
from serve_app.deployments.user_tower import UserFeatureSource
from serve_app.models import ModelSource
from serve_app.recommend import recommend_in_process
from serve_app.stages.records import Query
from serve_app.stages.user_tower import NumpyUserTower

if TYPE_CHECKING:
    from tests.conftest import ServingApp, TrainedBundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PURE_RANKER = RankingConfig(
    cold_start_min_events=0, mmr_lambda=1.0, max_category_share=1.0, popularity_candidates=0
)


@dataclass(frozen=True)
class Offline:
    """The offline evaluation's top-k per user, and what the served side needs to ask for it."""

    users: list[str]
    k: int
    expected: list[list[str]]
    vectors: np.ndarray  # the offline tower's output per user (TorchScript)


@pytest.fixture(scope="module")
def offline(trained_bundle: TrainedBundle) -> Offline:
    """The offline ranking, computed with the training code (no serving code)."""
    from training.config import TwoTowerConfig
    from training.data import read_dataset
    from training.features import encode_log, user_states_at
    from training.ranker import ranking_inputs, rerank
    from training.two_tower import encode_users, read_user_tower

    settings = ServeSettings(
        feature_store={"data_dir": trained_bundle.data_dir, "profile": "embedded"},
        models={"tracking_uri": trained_bundle.tracking_uri},
    )
    model = ModelSource.from_settings(settings).load(trained_bundle.version)
    bundle = model.bundle

    dataset = read_dataset(trained_bundle.dataset_dir)
    log = encode_log(
        dataset.events,
        pd.Index(bundle.item_ids),
        bundle.item_categories,
        len(bundle.manifest.categories),
    )
    everyone = user_states_at(log, log.user_ids, None, model.history_length)
    users = everyone.user_ids[everyone.event_count > 0][:120]
    assert len(users) >= 100
    states = user_states_at(log, users, None, model.history_length)
    tower = TwoTowerConfig(
        user_buckets=model.user_buckets,
        history_length=model.history_length,
        embedding_dim=bundle.manifest.embedding_dim,
    )
    # The bundle's tower read back into training's torch module (encode_users runs it in torch).
    vectors = encode_users(read_user_tower(bundle.path), states, tower)
    assert model.collaborative is not None, "the fixture's pipeline ships collaborative models"
    inputs = ranking_inputs(
        vectors,
        bundle.item_embeddings,
        states,
        bundle.item_features,
        bundle.item_categories,
        model.n_candidates,
        model.collaborative,
    )
    assert inputs.names == tuple(bundle.manifest.ranker_features)
    ranked = rerank(bundle.ranker, inputs.features, inputs.candidates)
    k = model.n_candidates  # a larger k would fetch more from the index
    expected = [
        [str(bundle.item_ids[i]) for i in ranked[row] if i >= 0][:k] for row in range(len(users))
    ]
    return Offline([str(u) for u in users], k, expected, vectors)


def test_serving_pipeline_reproduces_the_offline_ranking(
    trained_bundle: TrainedBundle, redis_url: str, key_prefix: str, offline: Offline
) -> None:
    settings = ServeSettings(
        feature_store={"data_dir": trained_bundle.data_dir, "profile": "embedded"},
        redis_url=redis_url,
        realtime={"key_prefix": key_prefix},  # nobody's real-time state: the snapshot only
        models={"tracking_uri": trained_bundle.tracking_uri},
    )
    source = ModelSource.from_settings(settings)
    version = source.resolve()
    assert version == trained_bundle.version
    model = source.load(version)
    # Two independent forwards: serving runs the tower in numpy, the offline side in torch.
    assert isinstance(model.tower.tower, NumpyUserTower)
    users, k = offline.users, offline.k
    features, seen = UserFeatureSource.from_settings(settings).read(model, users)
    assert not features.degraded and seen is not None
    # The materialized base embedding is the offline tower output for the same state.
    np.testing.assert_allclose(features.base_embedding, offline.vectors, atol=1e-6)
    queries = [
        Query(request_id=str(i), user_id=str(u), k=k, model_version=version)
        for i, u in enumerate(users)
    ]
    online = recommend_in_process(model, queries, features, seen, PURE_RANKER)

    mismatched = []
    sources: set[str] = set()
    for row, result in enumerate(online):
        got = [item.item_id for item in result.items]
        if got != offline.expected[row]:
            mismatched.append(str(users[row]))
        assert result.fallback is None
        sources.update(item.source for item in result.items)
    assert mismatched == [], f"{len(mismatched)} of {len(users)} users differ: {mismatched[:5]}"
    assert sources == {"retrieval", "collaborative"}


@pytest.fixture(scope="module", params=["split", "two-tier", "fused"])
def placed_graph(
    request: pytest.FixtureRequest, serving_app: ServingApp, redis_url: str
) -> Iterator[str]:
    """The graph under one placement beside the session's, ranking as the offline side does (MMR
    off, no rules) and nobody's real-time state; its base URL."""
    from ray import serve

    from serve_app.cli import deploy, wait_ready
    from serve_app.config import serve_config

    placement = request.param
    name = f"parity-{placement}"
    prefix = f"/{name}"
    bundle = serving_app.bundle
    config = serve_config({}, placement=placement)
    for deployment in config["applications"][0]["deployments"]:
        # Beside the session's graph on 2 CPUs: a small CPU share and one replica each.
        deployment["ray_actor_options"]["num_cpus"] = 0.01
        deployment["autoscaling_config"].update(min_replicas=1, initial_replicas=1, max_replicas=1)
    settings = {
        "feature_store": {"data_dir": str(bundle.data_dir), "profile": "embedded"},
        "redis_url": redis_url,
        "realtime": {"key_prefix": f"test:{uuid.uuid4().hex[:12]}"},
        "models": {"tracking_uri": bundle.tracking_uri},
        "ranking": PURE_RANKER.model_dump(),
        "placement": placement,
    }
    deploy(settings, config, name=name, route_prefix=prefix)
    try:
        wait_ready(serving_app.url + prefix, 300)
        yield serving_app.url + prefix
    finally:
        serve.delete(name)


def test_the_served_ranking_is_the_offline_one_under_every_placement(
    placed_graph: str, offline: Offline
) -> None:
    mismatched = []
    with httpx.Client(base_url=placed_graph, timeout=30.0) as client:
        for user, expected in zip(offline.users, offline.expected, strict=True):
            response = client.post("/v1/recommendations", json={"user_id": user, "k": offline.k})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["fallback"] is None, body
            if [item["item_id"] for item in body["items"]] != expected:
                mismatched.append(user)
    assert mismatched == [], f"{len(mismatched)} of {len(offline.users)} users differ"
