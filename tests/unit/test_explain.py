"""The explain trace (`serve_app.stages.explain`) on the small real bundle of test_recommend: what it says
each rule removed and MMR changed is checked against hand-built candidates, the ranker's feature
contributions against XGBoost's own margin, and the served list against the same request unexplained.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import xgboost as xgb

from serve_app.config import RankingConfig
from serve_app.features import FeatureShapes, assemble_user_features
from serve_app.recommend import ServingModel, recommend_in_process
from serve_app.stages import reranker
from serve_app.stages.explain import (
    MAX_LISTED,
    TOP_FEATURES,
    TOP_PER_SOURCE,
    ExplainTrace,
    shap_rows,
)
from serve_app.stages.ranker import feature_matrix, score_batch
from serve_app.stages.records import Candidates, Filters, Query, Scored
from tests.unit.test_recommend import DIM, HISTORY, NO_RULES, make_model, user_state


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return make_model()


def explained(user: Any) -> Any:
    return replace(user, query=replace(user.query, explain=True))


def features_of(model: ServingModel) -> Any:
    shapes = FeatureShapes(n_categories=3, embedding_dim=DIM, history_length=HISTORY)
    batch: dict[str, list[Any]] = {
        "event_count": [6.0, 6.0],
        "category_prefs": [[0.1, 0.6, 0.3], [0.1, 0.6, 0.3]],
        "base_embedding": [None, None],
        "recent_items": [["i01", "i02"], ["i01", "i02"]],
    }
    return assemble_user_features(["u", "v"], batch, None, shapes, "7", False)


def test_explain_changes_nothing_served_and_is_absent_unless_asked(model: ServingModel) -> None:
    queries = [
        Query("a", "u", 5, model_version="7"),
        Query("b", "v", 5, model_version="7", explain=True),
    ]
    ranking = RankingConfig()
    plain, asked = recommend_in_process(model, queries, features_of(model), [(), ()], ranking)
    assert plain.trace is None
    assert isinstance(asked.trace, ExplainTrace)
    unasked = [replace(q, explain=False) for q in queries]
    _, again = recommend_in_process(model, unasked, features_of(model), [(), ()], ranking)
    assert again.trace is None and asked.items == again.items
    trace = asked.trace
    assert [i.item_id for i in trace.items] == [i.item_id for i in asked.items]
    assert [i.rank for i in trace.items] == [1, 2, 3, 4, 5]
    assert trace.user.combined is not None and len(trace.user.combined) == DIM
    assert trace.user.base is not None and trace.user.delta == [0.0] * DIM  # no real-time events
    np.testing.assert_allclose(trace.user.combined, trace.user.base, atol=1e-5)  # nothing added
    assert {s.source for s in trace.candidates} == {"retrieval", "collaborative", "popularity"}
    assert all(len(s.top) <= TOP_PER_SOURCE for s in trace.candidates)


def test_the_trace_names_what_each_rule_removed(model: ServingModel) -> None:
    user = explained(
        user_state(
            model,
            vector=model.bundle.item_embeddings[1],
            seen=[3],
            filters=Filters(exclude_categories=frozenset({"c"})),
            k=10,
        )
    )
    rows = np.array([3, 4, 4, 2, 6, 7, 9, 10], dtype=np.int64)  # 3 seen, 4 twice, 2 in category c
    scores = np.arange(8, 0, -1).astype(np.float32)
    result = reranker.rerank(
        model.reranking,
        Scored(Candidates(user, rows, np.zeros(8, np.float32), 8), scores),
        NO_RULES,
    )
    assert result.trace is not None
    removed = {r.rule: r.item_ids for r in result.trace.removed}
    assert removed == {
        "duplicate": ["i04"],
        "seen": ["i03"],
        "filters": [f"i{r:02d}" for r in range(2, 30, 3)],  # every item of category c
        "category_cap": [],
    }
    assert [r.at_rerank for r in result.trace.removed] == [1, 1, 1, 0]
    # Kept out of the list: also what the retriever never searched (seen row 3, category c).
    counts = {r.rule: r.count for r in result.trace.removed}
    assert counts == {"duplicate": 1, "seen": 1, "filters": 10, "category_cap": 0}
    assert result.trace.mmr.moved == 0 and result.trace.mmr.promoted == []


def test_the_trace_shows_what_the_cap_removed_and_what_mmr_reordered(model: ServingModel) -> None:
    # Categories: row % 3 (0 a, 1 b, 2 c). Relevance order 0, 3, 6, 1, 2: three of category a first.
    user = explained(user_state(model, vector=model.bundle.item_embeddings[1], k=4))
    rows = np.array([0, 3, 6, 1, 2], dtype=np.int64)
    scores = np.array([5, 4, 3, 2, 1], dtype=np.float32)
    ranking = RankingConfig(
        cold_start_min_events=0, mmr_lambda=1.0, max_category_share=0.5, popularity_candidates=0
    )  # cap: 2 per category of 4
    result = reranker.rerank(
        model.reranking, Scored(Candidates(user, rows, np.zeros(5, np.float32), 5), scores), ranking
    )
    assert [i.item_id for i in result.items] == ["i00", "i03", "i01", "i02"]
    trace = result.trace
    assert trace is not None
    cap = next(r for r in trace.removed if r.rule == "category_cap")
    assert cap.item_ids == ["i06"]
    assert [i.relevance_rank for i in trace.items] == [1, 2, 4, 5]
    assert trace.mmr.category_cap == 2 and trace.mmr.moved == 0  # lambda 1: the capped order
    diverse = reranker.rerank(
        model.reranking,
        Scored(Candidates(user, rows, np.zeros(5, np.float32), 5), scores),
        ranking.model_copy(update={"mmr_lambda": 0.3, "max_category_share": 1.0}),
    )
    assert diverse.trace is not None
    relevance_top = ["i00", "i03", "i06", "i01"]
    served = [i.item_id for i in diverse.items]
    assert diverse.trace.mmr.promoted == [i for i in served if i not in relevance_top]
    assert diverse.trace.mmr.displaced == [i for i in relevance_top if i not in served]
    moved = sum(
        1 for r, i in enumerate(served) if relevance_top.index(i) != r if i in relevance_top
    )
    assert diverse.trace.mmr.moved == moved + len(diverse.trace.mmr.promoted)


def test_ranker_contributions_add_up_to_the_served_margin(model: ServingModel) -> None:
    user = explained(user_state(model, vector=model.bundle.item_embeddings[1], k=3))
    rows = np.array([10, 11, 12, 13], dtype=np.int64)
    candidates = Candidates(user, rows, np.array([0.9, 0.5, 0.2, 0.1], np.float32), 4)
    (scored,) = score_batch(model.ranking, [candidates])
    trace = scored.ranker_trace
    assert trace is not None
    x = feature_matrix(model.ranking, [candidates])
    np.testing.assert_array_equal(trace.features, x)
    margin = model.ranking.booster.predict(xgb.DMatrix(x), output_margin=True)
    np.testing.assert_allclose(trace.contributions.sum(axis=1) + trace.bias, margin, atol=1e-5)
    np.testing.assert_allclose(scored.scores, margin, atol=1e-5)
    result = reranker.rerank(model.reranking, scored, NO_RULES)
    assert result.trace is not None
    for item in result.trace.items:
        assert len(item.features) == TOP_FEATURES
        sizes = [abs(f.contribution) for f in item.features]
        assert sizes == sorted(sizes, reverse=True)
        row = int(np.flatnonzero(model.bundle.item_ids[rows] == item.item_id)[0])
        assert max(np.abs(trace.contributions[row])) == pytest.approx(sizes[0], abs=1e-5)
    plain_user = replace(user, query=replace(user.query, explain=False))
    (unexplained,) = score_batch(model.ranking, [replace(candidates, user=plain_user)])
    assert unexplained.ranker_trace is None


def test_lists_in_the_trace_are_bounded(model: ServingModel) -> None:
    seen = list(range(0, 30, 1))[: MAX_LISTED + 5]
    user = explained(user_state(model, vector=model.bundle.item_embeddings[1], seen=seen, k=3))
    rows = np.arange(30, dtype=np.int64)
    result = reranker.rerank(
        model.reranking,
        Scored(Candidates(user, rows, np.zeros(30, np.float32), 30), np.zeros(30, np.float32)),
        NO_RULES,
    )
    assert result.trace is not None
    seen_rule = next(r for r in result.trace.removed if r.rule == "seen")
    assert seen_rule.count == MAX_LISTED + 5 and len(seen_rule.item_ids) == MAX_LISTED
    retrieval = next(s for s in result.trace.candidates if s.source == "retrieval")
    assert retrieval.count == 30 and len(retrieval.top) == TOP_PER_SOURCE


def test_only_the_best_scored_candidates_get_contributions() -> None:
    scores = np.arange(100, dtype=np.float32)[::-1].copy()  # candidate 0 best
    assert shap_rows(scores, 5).tolist() == list(range(30))  # at least 30
    assert shap_rows(scores, 20).tolist() == list(range(60))  # 3 per item asked
    assert shap_rows(np.array([0.1, 0.9], np.float32), 10).tolist() == [0, 1]
