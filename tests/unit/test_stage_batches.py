"""Every stage answers a batch exactly as it answers each of its requests alone, and a batch that
mixes bundle versions is split by version inside the stage (`VersionedStage.each_version`)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import numpy as np

from serve_app.config import RankingConfig
from serve_app.models import VersionedStage
from serve_app.recommend import ServingModel
from serve_app.stages.ranker import score_batch
from serve_app.stages.records import Filters, Query, Recommendations, UserState, version_of
from serve_app.stages.reranker import popular_batch, rerank_batch
from serve_app.stages.retriever import retrieve_batch
from tests.unit.test_recommend import HISTORY, make_model

RANKING = RankingConfig(candidates=8, cold_start_min_events=4, popularity_candidates=3)


def users(model: ServingModel, version: str) -> list[UserState]:
    """Heavy, light, cold, filtered and segment users: every path of retrieval and re-ranking."""
    emb = model.bundle.item_embeddings
    prefs = np.array([0.2, 0.5, 0.3], dtype=np.float32)

    def user(i: int, vector: np.ndarray | None, interactions: int, **query: Any) -> UserState:
        recent = np.zeros(HISTORY, dtype=np.int64)
        recent[: min(2, interactions)] = [3, 8][: min(2, interactions)]
        return UserState(
            query=Query(f"r{i}", f"u{i}", query.pop("k", 5), model_version=version, **query),
            vector=vector,
            event_count=float(interactions),
            category_prefs=prefs if vector is not None else np.zeros(3, np.float32),
            recent=recent,
            seen=np.array([2, 7][: min(2, interactions)], dtype=np.int64),
            interactions=interactions,
            degraded=False,
        )

    return [
        user(0, emb[1], 9),
        user(1, emb[4], 2, k=3),
        user(2, None, 0),
        user(3, emb[7], 9, filters=Filters(exclude_categories=frozenset({"a"}))),
        user(4, None, 0, segment="b", k=4),
        user(5, emb[11], 9, k=12, filters=Filters(exclude_item_ids=frozenset({"i05", "i06"}))),
    ]


def pipeline(model: ServingModel, batch: list[UserState]) -> list[Recommendations]:
    candidates = retrieve_batch(model.retrieval, batch, RANKING)
    return rerank_batch(model.reranking, score_batch(model.ranking, candidates), RANKING)


def listing(result: Recommendations) -> list[tuple[str, float, str]]:
    return [(i.item_id, i.score, i.source) for i in result.items]


def test_a_batch_of_mixed_users_gets_what_each_user_gets_alone() -> None:
    model = make_model()
    batch = users(model, "7")
    together = pipeline(model, batch)
    alone = [pipeline(model, [u])[0] for u in batch]
    assert [r.request_id for r in together] == [u.query.request_id for u in batch]
    assert [listing(r) for r in together] == [listing(r) for r in alone]
    assert {r.fallback for r in together} == {None, "cold_start"}
    assert {i.source for r in together for i in r.items} >= {"retrieval", "popularity"}


def test_the_batched_ranker_scores_each_candidate_as_alone() -> None:
    model = make_model()
    batch = retrieve_batch(model.retrieval, users(model, "7"), RANKING)
    together = score_batch(model.ranking, batch)
    for candidates, scored in zip(batch, together, strict=True):
        (alone,) = score_batch(model.ranking, [candidates])
        assert scored.candidates is candidates
        np.testing.assert_array_equal(scored.scores, alone.scores)


class TwoVersions(VersionedStage[ServingModel]):
    """A stage holding two loaded versions, without Ray or a registry."""

    def __init__(self, models: dict[str, ServingModel]) -> None:
        from collections import OrderedDict

        self._models = OrderedDict(models)
        self._loading = {}


def test_a_batch_mixing_versions_is_answered_by_each_version_in_order() -> None:
    old = ServingModel.from_bundle(make_model(seed=0).bundle, "7")
    new = ServingModel.from_bundle(make_model(seed=1).bundle, "8")
    stage = TwoVersions({"7": old, "8": new})
    mixed = [
        replace(u, query=replace(u.query, request_id=f"{v}-{u.query.request_id}", model_version=v))
        for u, v in zip(users(old, "7") + users(new, "8"), ["7"] * 6 + ["8"] * 6, strict=True)
    ]
    mixed = mixed[::2] + mixed[1::2]  # interleaved: 7, 7, 7, 8, 8, 8, 7, 7, 7, 8, 8, 8
    calls: list[str] = []

    def run(model: ServingModel, part: list[UserState]) -> list[Recommendations]:
        calls.append(model.version)
        return pipeline(model, part)

    out = asyncio.run(stage.each_version(mixed, version_of, run))
    assert calls == ["7", "8"]  # one call per version, whatever the interleaving
    assert [r.request_id for r in out] == [u.query.request_id for u in mixed]
    for user, result in zip(mixed, out, strict=True):
        model = old if user.query.model_version == "7" else new
        assert result.model_version == user.query.model_version
        assert listing(result) == listing(pipeline(model, [user])[0])
    # The two bundles really differ: a version mix-up could not pass unnoticed.
    assert [listing(r) for r in pipeline(old, users(old, "7"))] != [
        listing(r) for r in pipeline(new, users(new, "8"))
    ]


def test_the_retrievers_fallback_is_popularity_by_segment_through_the_same_rules() -> None:
    model = make_model()
    batch = users(model, model.version)
    answers = popular_batch(model.reranking, batch, RANKING)
    assert [a.request_id for a in answers] == [u.query.request_id for u in batch]
    catalog = model.reranking.catalog
    for user, answer in zip(batch, answers, strict=True):
        assert answer.fallback == "degraded"
        assert 0 < len(answer.items) <= user.query.k  # the bundle lists a few popular items
        assert {i.source for i in answer.items} == {"popularity"}
        rows = catalog.rows_of([i.item_id for i in answer.items])
        assert not np.isin(rows, user.seen).any()  # no repeats, as in a whole answer
        assert not np.isin(rows, catalog.filter_rows(user.query.filters)).any()
    assert len(answers[0].items) == batch[0].query.k
    # The segment's (or the user's top category's) popular items lead, as in a cold start.
    segment_user = batch[4]
    top = model.reranking.popularity.rows("b", segment_user.seen, 1)
    assert answers[4].items[0].item_id == str(catalog.item_ids[top[0]])
