"""Offline/online parity: the serving pipeline, fed from the Feast online store, reproduces the offline
evaluation's ranking for the same users (same candidates, same order) with MMR off and no rules.

The offline side is computed with the training code on the event log (`user_states_at`, `encode_users`,
`ranking_inputs` with the bundle's collaborative models, `rerank`: what `training.pipeline`'s evaluate
stage runs); the
online side reads the registered bundle from MLflow (cache + verification) and the materialized
`user_profile` rows through the same readers the UserTower deployment uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest

from serve_app.config import RankingConfig, ServeSettings
from serve_app.models import ModelSource
from serve_app.recommend import recommend_in_process
from serve_app.stages.records import Query
from serve_app.stages.user_tower import NumpyUserTower
from serve_app.user_tower import UserFeatureSource

if TYPE_CHECKING:
    from tests.conftest import TrainedBundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PURE_RANKER = RankingConfig(
    cold_start_min_events=0, mmr_lambda=1.0, max_category_share=1.0, popularity_candidates=0
)


def test_serving_pipeline_reproduces_the_offline_ranking(
    trained_bundle: TrainedBundle, redis_url: str, key_prefix: str
) -> None:
    from training.config import TwoTowerConfig
    from training.data import read_dataset
    from training.features import encode_log, user_states_at
    from training.ranker import ranking_inputs, rerank
    from training.two_tower import encode_users, read_user_tower

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
    bundle = model.bundle
    # Two independent forwards: serving runs the tower in numpy, the offline side in torch.
    assert isinstance(model.tower.tower, NumpyUserTower)

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
    offline = rerank(bundle.ranker, inputs.features, inputs.candidates)

    features, seen = UserFeatureSource.from_settings(settings).read(model, [str(u) for u in users])
    assert not features.degraded and seen is not None
    # The materialized base embedding is the offline tower output for the same state.
    np.testing.assert_allclose(features.base_embedding, vectors, atol=1e-6)
    k = model.n_candidates  # a larger k would fetch more from the index
    queries = [
        Query(request_id=str(i), user_id=str(u), k=k, model_version=version)
        for i, u in enumerate(users)
    ]
    online = recommend_in_process(model, queries, features, seen, PURE_RANKER)

    mismatched = []
    sources: set[str] = set()
    for row, result in enumerate(online):
        expected = [str(bundle.item_ids[i]) for i in offline[row] if i >= 0][:k]
        got = [item.item_id for item in result.items]
        if got != expected:
            mismatched.append(str(users[row]))
        assert result.fallback is None
        sources.update(item.source for item in result.items)
    assert mismatched == [], f"{len(mismatched)} of {len(users)} users differ: {mismatched[:5]}"
    assert sources == {"retrieval", "collaborative"}
