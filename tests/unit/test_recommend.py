"""The pure serving stages (serve_app.stages, chained by serve_app.recommend) on a small real bundle
built in memory, one request at a time (the batch behaviour: tests/unit/test_stage_batches.py).

Expectations come from hand computation, numpy brute force, or the training code (`training.two_tower`,
`training.features`), which is the independent definition serving must reproduce.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import xgboost as xgb

from serve_app.bundle import Bundle
from serve_app.config import RankingConfig
from serve_app.contract import (
    CF_FEATURE_NAMES,
    ITEM_FEATURE_NAMES,
    RANKER_FEATURE_NAMES,
    RANKER_FEATURE_NAMES_CF,
    RANKER_FEATURE_NAMES_CF_LEGACY,
    Collaborative,
    hash_bucket,
)
from serve_app.errors import BundleIntegrityError
from serve_app.features import FeatureShapes, UserRealtimeState, assemble_user_features
from serve_app.ids import ItemIndex
from serve_app.recommend import ServingModel, recommend_in_process
from serve_app.schemas import BundleManifest, IndexSpec
from serve_app.stages import reranker, user_tower
from serve_app.stages.ranker import feature_matrix, score_batch
from serve_app.stages.records import Candidates, Filters, Query, Recommendations, Scored, UserState
from serve_app.stages.reranker import category_cap, mmr_select
from serve_app.stages.retriever import OVERFETCH_LIMIT, retrieve_batch, search_batch
from serve_app.stages.user_tower import add_delta, encode_recent
from training.two_tower import UserTower

CATEGORIES = ("a", "b", "c")
N_ITEMS, DIM, HISTORY, BUCKETS = 30, 4, 3, 16
NO_RULES = RankingConfig(
    cold_start_min_events=0, mmr_lambda=1.0, max_category_share=1.0, popularity_candidates=0
)


# One request through each stage's batch function (a batch of one).


def tower_inputs(
    model: ServingModel, users: list[str], count: np.ndarray, prefs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    return user_tower.tower_inputs(model.tower, users, count, prefs)


def user_vectors(
    model: ServingModel, buckets: np.ndarray, profile: np.ndarray, recent: np.ndarray
) -> np.ndarray:
    return user_tower.user_vectors(model.tower, buckets, profile, recent)


def embed_users(model: ServingModel, *args: Any) -> list[UserState]:
    return user_tower.embed_users(model.tower, *args)


def search(
    index: faiss.Index, vector: np.ndarray, n: int, excluded: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    return search_batch(index, vector[None, :], [n], [excluded])[0]


def filter_rows(model: ServingModel, filters: Filters) -> np.ndarray:
    return model.retrieval.catalog.filter_rows(filters)


def popularity_rows(
    model: ServingModel, category: str | None, excluded: np.ndarray, count: int
) -> np.ndarray:
    return model.retrieval.popularity.rows(category, excluded, count)


def retrieve(model: ServingModel, user: UserState, ranking: RankingConfig) -> Candidates:
    return retrieve_batch(model.retrieval, [user], ranking)[0]


def candidate_features(model: ServingModel, candidates: Candidates) -> np.ndarray:
    return feature_matrix(model.ranking, [candidates])


def score(model: ServingModel, candidates: Candidates) -> Scored:
    return score_batch(model.ranking, [candidates])[0]


def rerank(model: ServingModel, scored: Scored, ranking: RankingConfig) -> Recommendations:
    return reranker.rerank(model.reranking, scored, ranking)


def tower_weights(seed: int) -> dict[str, np.ndarray]:
    """The arrays of `user_tower.npz` (training's tower, untrained), deterministic in `seed`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tower = UserTower(BUCKETS, N_ITEMS, 1 + len(CATEGORIES), DIM, DIM)
    return {k: v.detach().numpy().astype(np.float32) for k, v in tower.state_dict().items()}


def make_model(
    seed: int = 0,
    collaborative: Collaborative | None = None,
    features_names: tuple[str, ...] = RANKER_FEATURE_NAMES,
) -> ServingModel:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    item_ids = np.array([f"i{i:02d}" for i in range(N_ITEMS)])
    categories = (np.arange(N_ITEMS) % 3).astype(np.int32)  # i00 a, i01 b, i02 c, i03 a, ...
    features = rng.uniform(size=(N_ITEMS, len(ITEM_FEATURE_NAMES))).astype(np.float32)
    index = faiss.IndexFlatIP(DIM)
    index.add(emb)
    x = rng.uniform(size=(200, len(features_names))).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(np.float32)
    data = xgb.DMatrix(x, label=y)
    data.set_group([10] * 20)
    ranker = xgb.train({"objective": "rank:ndcg", "nthread": 1, "seed": 0}, data, 3)
    popularity = {
        "global": [f"i{i:02d}" for i in (5, 4, 3, 2, 1, 0)],
        "by_category": {"b": ["i07", "i04", "i01"]},
    }
    manifest = BundleManifest(
        model_name="recserve",
        model_version="7",
        created_at="2024-01-01T00:00:00Z",
        data_snapshot_id="unit",
        embedding_dim=DIM,
        num_items=N_ITEMS,
        user_tower={"user_buckets": BUCKETS, "history_length": HISTORY, "profile_dim": 4},
        user_tower_inputs=[],
        ranker_features=list(features_names),
        item_feature_names=list(ITEM_FEATURE_NAMES),
        categories=list(CATEGORIES),
        index=IndexSpec(type="flat"),
        params={"ranker.candidates": 10},
        files={},
    )
    bundle = Bundle(
        path=Path("."),
        manifest=manifest,
        user_tower_weights=tower_weights(seed),
        item_ids=item_ids,
        item_embeddings=emb,
        item_features=features,
        item_categories=categories,
        index=index,
        ranker=ranker,
        popularity=popularity,
        item_index=ItemIndex.from_ids(item_ids),
        collaborative=collaborative,
    )
    return ServingModel.from_bundle(bundle)


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return make_model()


def user_state(
    model: ServingModel,
    *,
    vector: np.ndarray | None,
    seen: list[int] = (),  # type: ignore[assignment]
    interactions: int = 10,
    degraded: bool = False,
    k: int = 5,
    filters: Filters | None = None,
    segment: str | None = None,
) -> UserState:
    return UserState(
        query=Query(
            request_id="r",
            user_id="u",
            k=k,
            filters=filters or Filters(),
            segment=segment,
            model_version="7",
        ),
        vector=vector,
        event_count=float(interactions),
        category_prefs=np.array([0.2, 0.5, 0.3], dtype=np.float32),
        recent=np.zeros(HISTORY, dtype=np.int64),
        seen=np.array(sorted(seen), dtype=np.int64),
        interactions=interactions,
        degraded=degraded,
    )


# --- user tower ----------------------------------------------------------------------------------


def test_tower_inputs_match_the_training_encoding(model: ServingModel) -> None:
    from training.features import UserStates
    from training.two_tower import user_buckets

    users = ["alice", "bob", "new"]
    count = np.array([3.0, 10.0, 0.0], dtype=np.float32)
    prefs = np.array([[1, 0, 0], [0.25, 0.25, 0.5], [0, 0, 0]], dtype=np.float32)
    buckets, profile = tower_inputs(model, users, count, prefs)
    expected_buckets = user_buckets(np.array(users), BUCKETS)
    expected_buckets[2] = 0  # no positive event at the snapshot: the unknown-user bucket
    assert buckets.tolist() == expected_buckets.tolist()
    assert buckets[0] == hash_bucket("alice", BUCKETS) + 1
    seen = sp.csr_matrix((3, N_ITEMS), dtype=np.float32)
    states = UserStates(np.array(users), count, prefs, np.zeros((3, HISTORY), np.int64), seen)
    np.testing.assert_array_equal(profile, states.profile())
    assert profile[1, 0] == np.float32(math.log1p(10.0))


def test_recent_history_is_row_plus_one_newest_first_unknown_items_skipped(
    model: ServingModel,
) -> None:
    got = encode_recent(["i04", "gone", "i00", "i09"], model.bundle.item_index, HISTORY)
    assert got.tolist() == [5, 1, 10]
    assert encode_recent(["i01"], model.bundle.item_index, HISTORY).tolist() == [2, 0, 0]


def test_delta_moves_only_users_that_have_one() -> None:
    base = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    delta = np.array([[0.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    out = add_delta(base, delta, 0.5)
    assert out[0].tobytes() == base[0].tobytes()  # untouched bit for bit (parity)
    moved = np.array([0.6, 1.3]) / math.hypot(0.6, 1.3)
    np.testing.assert_allclose(out[1], moved, rtol=1e-6)
    assert add_delta(base, delta, 0.0).tobytes() == base.tobytes()


def test_embed_users_marks_unknown_users_cold_and_excludes_seen_and_recent(
    model: ServingModel,
) -> None:
    shapes = FeatureShapes(n_categories=3, embedding_dim=DIM, history_length=HISTORY)
    batch: dict[str, list[Any]] = {
        "event_count": [4.0, None],
        "category_prefs": [[0.5, 0.5, 0.0], None],
        "base_embedding": [None, None],
        "recent_items": [["i03", "i01"], None],
    }
    realtime = [
        UserRealtimeState(None, None, ("i08",), 1, 1, None),
        UserRealtimeState(None, None, (), 0, 0, None),
    ]
    features = assemble_user_features(["known", "nobody"], batch, realtime, shapes, "7", False)
    queries = [
        Query("r1", "known", 5, model_version="7"),
        Query("r2", "nobody", 5, model_version="7"),
    ]
    known, cold = embed_users(model, queries, features, [("i03", "i01", "i12"), ()], NO_RULES)
    recent = np.array([[9, 4, 2]])  # i08 (since the snapshot) ahead of the snapshot's i03, i01
    assert known.recent.tolist() == recent[0].tolist()
    bucket, profile = tower_inputs(
        model, ["known"], np.array([4.0], np.float32), np.array([[0.5, 0.5, 0.0]], np.float32)
    )
    np.testing.assert_array_equal(known.vector, user_vectors(model, bucket, profile, recent)[0])
    assert known.seen.tolist() == [1, 3, 8, 12]
    assert known.interactions == 4 and not known.degraded
    assert cold.vector is None and cold.interactions == 0
    unread = embed_users(model, queries, features, None, NO_RULES)[0]
    assert unread.degraded  # seen items unreadable: served, but flagged


# --- retriever -----------------------------------------------------------------------------------


def _brute_force(emb: np.ndarray, vector: np.ndarray, n: int, excluded: set[int]) -> list[int]:
    scores = emb @ vector
    order = [int(i) for i in np.argsort(-scores, kind="stable") if int(i) not in excluded]
    return order[:n]


@pytest.mark.parametrize("n_excluded", [5, OVERFETCH_LIMIT + 500])
def test_search_returns_the_exact_top_n_without_excluded_rows(n_excluded: int) -> None:
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(3_000, 8)).astype(np.float32)
    index = faiss.IndexFlatIP(8)
    index.add(emb)
    vector = rng.normal(size=8).astype(np.float32)
    top = _brute_force(emb, vector, 3_000, set())
    excluded = np.array(sorted(top[:n_excluded:2] + top[-n_excluded // 2 :]), dtype=np.int64)
    rows, scores = search(index, vector, 20, excluded)
    assert rows.tolist() == _brute_force(emb, vector, 20, set(excluded.tolist()))
    np.testing.assert_allclose(scores, emb[rows] @ vector, rtol=1e-5)


def test_filters_exclude_items_and_categories_or_keep_only_some(model: ServingModel) -> None:
    rows = filter_rows(model, Filters(exclude_item_ids=frozenset({"i05", "unknown"})))
    assert rows.tolist() == [5]
    rows = filter_rows(model, Filters(exclude_categories=frozenset({"b"})))
    assert rows.tolist() == list(range(1, N_ITEMS, 3))
    rows = filter_rows(model, Filters(categories=frozenset({"a", "c"})))
    assert rows.tolist() == list(range(1, N_ITEMS, 3))


def test_popularity_puts_the_category_list_first_then_global_without_excluded(
    model: ServingModel,
) -> None:
    got = popularity_rows(model, "b", np.array([4]), 6)
    assert got.tolist() == [7, 1, 5, 3, 2, 0]
    assert popularity_rows(model, None, np.zeros(0), 3).tolist() == [5, 4, 3]
    assert popularity_rows(model, "no-such", np.zeros(0), 2).tolist() == [5, 4]


def test_light_user_gets_popularity_candidates_after_the_retrieved_ones(
    model: ServingModel,
) -> None:
    vector = model.bundle.item_embeddings[0]
    ranking = RankingConfig(candidates=4, cold_start_min_events=5, popularity_candidates=3)
    light = retrieve(
        model, user_state(model, vector=vector, interactions=2, seen=[0], k=4), ranking
    )
    retrieved = _brute_force(model.bundle.item_embeddings, vector, 4, {0})
    assert light.n_retrieved == 4 and light.rows[:4].tolist() == retrieved
    # The user prefers category b (prefs [0.2, 0.5, 0.3]): its list first, then global.
    pool = [r for r in (7, 4, 1, 5, 3, 2, 0) if r not in set(retrieved) | {0}]
    assert light.rows[4:].tolist() == pool[:3]
    heavy = retrieve(
        model, user_state(model, vector=vector, interactions=9, seen=[0], k=4), ranking
    )
    assert heavy.rows.tolist() == retrieved


# --- re-ranker -----------------------------------------------------------------------------------


def test_mmr_with_lambda_one_is_the_relevance_order_with_raw_scores() -> None:
    relevance = np.array([0.1, 0.9, 0.5, 0.9], dtype=np.float32)
    picked, scores = mmr_select(relevance, np.eye(4, dtype=np.float32), np.arange(4), 3, 1.0, None)
    assert picked.tolist() == [1, 3, 2]  # tie between 1 and 3 keeps candidate order
    assert scores.tolist() == pytest.approx([0.9, 0.9, 0.5])


def test_mmr_trades_relevance_for_diversity_as_computed_by_hand() -> None:
    # Items 0 and 1 are near duplicates; 2 is orthogonal but less relevant.
    emb = np.array([[1.0, 0.0], [0.995, 0.0998749], [0.0, 1.0]], dtype=np.float32)
    relevance = np.array([1.0, 0.9, 0.5], dtype=np.float32)  # normalised: 1, 0.8, 0
    picked, scores = mmr_select(relevance, emb, np.arange(3), 3, 0.5, None)
    # Step 1: 0.5 * 1 = 0.5 for item 0. Step 2: item 1: 0.5*0.8 - 0.5*0.995 = -0.0975,
    # item 2: 0.5*0 - 0.5*0 = 0 -> item 2. Step 3: item 1 again -0.0975 (max sim still 0.995).
    assert picked.tolist() == [0, 2, 1]
    assert scores.tolist() == pytest.approx([0.5, 0.0, -0.0975], abs=1e-5)


def test_mmr_scores_never_increase_down_the_list() -> None:
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for lam in (0.0, 0.3, 0.7, 0.95):
        _, scores = mmr_select(
            rng.normal(size=60).astype(np.float32), emb, rng.integers(0, 5, 60), 20, lam, 6
        )
        assert (np.diff(scores) <= 1e-7).all()


def test_category_cap_skips_items_of_a_full_category() -> None:
    assert (
        category_cap(10, 0.5) == 5 and category_cap(3, 0.5) == 2 and category_cap(10, 1.0) is None
    )
    relevance = np.array([9, 8, 7, 6, 5], dtype=np.float32)
    picked, _ = mmr_select(
        relevance, np.eye(5, dtype=np.float32), np.array([0, 0, 0, 1, 1]), 4, 1.0, 2
    )
    assert picked.tolist() == [0, 1, 3, 4]
    # Too few other categories for k = 5: the full one reopens, its item scored at the last score.
    picked, scores = mmr_select(
        relevance, np.eye(5, dtype=np.float32), np.array([0, 0, 0, 1, 1]), 5, 1.0, 2
    )
    assert picked.tolist() == [0, 1, 3, 4, 2]
    assert scores.tolist() == [9.0, 8.0, 6.0, 5.0, 5.0]


def test_cold_user_gets_the_popularity_list_flagged_cold_start(model: ServingModel) -> None:
    cold = user_state(model, vector=None, interactions=0, k=4)
    cold = UserState(**{**cold.__dict__, "category_prefs": np.zeros(3, np.float32)})
    ranking = RankingConfig(mmr_lambda=1.0, max_category_share=1.0)
    result = rerank(model, Scored(retrieve(model, cold, ranking), np.zeros(0, np.float32)), ranking)
    assert [i.item_id for i in result.items] == ["i05", "i04", "i03", "i02"]
    assert result.fallback == "cold_start" and {i.source for i in result.items} == {"popularity"}
    assert [i.rank for i in result.items] == [1, 2, 3, 4]
    with_segment = UserState(**{**cold.__dict__, "query": Query("r", "u", 4, segment="b")})
    result = rerank(
        model, Scored(retrieve(model, with_segment, ranking), np.zeros(0, np.float32)), ranking
    )
    assert [i.item_id for i in result.items] == ["i07", "i04", "i01", "i05"]
    degraded = UserState(**{**cold.__dict__, "degraded": True})
    result = rerank(
        model, Scored(retrieve(model, degraded, ranking), np.zeros(0, np.float32)), ranking
    )
    assert result.fallback == "degraded"


def test_rerank_never_repeats_seen_duplicate_or_filtered_items(model: ServingModel) -> None:
    user = user_state(
        model,
        vector=model.bundle.item_embeddings[1],
        seen=[3],
        filters=Filters(exclude_categories=frozenset({"c"})),
        k=10,
    )
    rows = np.array([3, 4, 4, 2, 6, 7, 9, 10], dtype=np.int64)  # 3 seen, 4 twice, 2 in category c
    candidates = Candidates(user, rows, np.zeros(8, np.float32), 8)
    scores = np.arange(8, 0, -1).astype(np.float32)
    result = rerank(model, Scored(candidates, scores), NO_RULES)
    assert [i.item_id for i in result.items] == ["i04", "i06", "i07", "i09", "i10"]
    assert [i.score for i in result.items] == [7.0, 4.0, 3.0, 2.0, 1.0]


def test_light_user_blends_ranker_score_with_popularity(model: ServingModel) -> None:
    user = user_state(model, vector=model.bundle.item_embeddings[1], interactions=1, k=3)
    rows = np.array([10, 11, 5], dtype=np.int64)  # two retrieved, then the most popular item
    candidates = Candidates(user, rows, np.zeros(3, np.float32), 2)
    ranking = RankingConfig(cold_start_min_events=4, mmr_lambda=1.0, max_category_share=1.0)
    result = rerank(model, Scored(candidates, np.array([2.0, 1.0, 0.0], np.float32)), ranking)
    # w = 1/4: 0.25 * [1, 0.5, 0] + 0.75 * prior [0, 0, 1] (i05 heads the global list).
    assert [(i.item_id, i.source) for i in result.items] == [
        ("i05", "popularity"),
        ("i10", "retrieval"),
        ("i11", "retrieval"),
    ]
    assert [i.score for i in result.items] == pytest.approx([0.75, 0.25, 0.125])


def test_in_process_pipeline_returns_k_distinct_unseen_items_in_score_order(
    model: ServingModel,
) -> None:
    shapes = FeatureShapes(n_categories=3, embedding_dim=DIM, history_length=HISTORY)
    batch: dict[str, list[Any]] = {
        "event_count": [6.0],
        "category_prefs": [[0.1, 0.6, 0.3]],
        "base_embedding": [None],
        "recent_items": [["i01", "i02"]],
    }
    features = assemble_user_features(["u"], batch, None, shapes, "7", False)
    query = Query("r", "u", 5, model_version="7")
    ranking = RankingConfig()
    (result,) = recommend_in_process(model, [query], features, [("i01", "i02", "i03")], ranking)
    ids = [i.item_id for i in result.items]
    assert len(ids) == 5 and len(set(ids)) == 5
    assert not {"i01", "i02", "i03"} & set(ids)
    assert all(a.score >= b.score for a, b in zip(result.items, result.items[1:], strict=False))
    assert result.model_version == "7" and result.fallback is None


def test_a_bundle_with_other_ranker_features_is_refused(tmp_path: Path) -> None:
    from serve_app.bundle import load_bundle
    from tests.bundle_factory import make_tiny_bundle

    make_tiny_bundle(tmp_path)
    with pytest.raises(BundleIntegrityError, match="ranker features"):
        ServingModel.from_bundle(load_bundle(tmp_path))


# --- collaborative candidates --------------------------------------------------------------------


def _item_item(entries: dict[tuple[int, int], float]) -> sp.csr_matrix:
    rows, cols = zip(*entries, strict=True)
    values = np.array(list(entries.values()), dtype=np.float32)
    return sp.csr_matrix((values, (rows, cols)), shape=(N_ITEMS, N_ITEMS))


def test_collaborative_candidates_follow_the_index_ones_and_feed_the_ranker() -> None:
    cf = Collaborative(
        ease=_item_item({(0, 20): 0.9, (0, 21): 0.5, (0, 1): 0.7}),  # item 1 is seen: never
        knn=_item_item({(2, 22): 0.3}),
        transitions=_item_item({(2, 23): 1.0}),
        last_items=1,
        per_source=5,
    )
    model = make_model(collaborative=cf, features_names=RANKER_FEATURE_NAMES_CF)
    assert model.collaborative is cf
    user = user_state(model, vector=model.bundle.item_embeddings[5], seen=[0, 1, 2])
    user = replace(user, recent=np.array([3, 1, 0]))  # newest first: item 2, then item 0
    ranking = RankingConfig(candidates=5, popularity_candidates=0)
    candidates = retrieve(model, user, ranking)

    index_rows = candidates.rows[: candidates.n_retrieved].tolist()
    assert candidates.n_retrieved == 5
    # ease (all seen) 20, 21; ease_last (item 2) nothing; next (item 2) 23; knn 22 -- minus any
    # row the index returned already.
    expected = [r for r in (20, 21, 23, 22) if r not in index_rows]
    assert expected and candidates.rows[5:].tolist() == expected
    assert candidates.n_collaborative == len(expected)
    assert candidates.cf_columns is not None
    assert candidates.cf_columns.shape == (len(candidates.rows), len(CF_FEATURE_NAMES))
    ease_score = candidates.cf_columns[:, CF_FEATURE_NAMES.index("ease_score")]
    expected_ease = {20: 0.9, 21: 0.5}
    assert ease_score.tolist() == pytest.approx(
        [expected_ease.get(int(r), 0.0) for r in candidates.rows]
    )
    x = candidate_features(model, candidates)
    assert x.shape == (len(candidates.rows), len(RANKER_FEATURE_NAMES_CF))
    result = rerank(model, score(model, candidates), NO_RULES)
    sources = {item.item_id: item.source for item in result.items}
    assert all(sources[f"i{r:02d}"] == "collaborative" for r in expected if f"i{r:02d}" in sources)
    assert not {"i00", "i01", "i02"} & set(sources)


def test_basket_reads_the_newest_items_and_a_legacy_ranker_gets_its_own_columns() -> None:
    cf = Collaborative(
        ease=_item_item({(0, 20): 0.9}),
        knn=_item_item({(2, 22): 0.3}),
        transitions=_item_item({(2, 23): 1.0}),
        last_items=1,
        per_source=5,
        basket=_item_item({(2, 24): 0.8, (0, 25): 0.6, (1, 26): 0.4}),
        basket_items=2,
    )
    for names in (RANKER_FEATURE_NAMES_CF, RANKER_FEATURE_NAMES_CF_LEGACY):
        model = make_model(collaborative=cf, features_names=names)
        user = user_state(model, vector=model.bundle.item_embeddings[5], seen=[0, 1, 2])
        # Newest first: 2, 0, then 1 (outside basket_items = 2: its neighbour 26 is not read).
        user = replace(user, recent=np.array([3, 1, 2, 0]))
        candidates = retrieve(model, user, RankingConfig(candidates=5))
        assert candidates.cf_columns is not None
        basket = candidates.cf_columns[:, CF_FEATURE_NAMES.index("basket_score")]
        scored = dict(zip(candidates.rows.tolist(), basket.tolist(), strict=True))
        assert scored[24] == pytest.approx(0.8) and scored[25] == pytest.approx(0.6)
        assert scored.get(26, 0.0) == 0.0
        # The ranker reads the columns it was trained on: 15 collaborative ones, or the 12 of a
        # bundle from before the basket signal (its XGBoost model refuses any other width).
        x = candidate_features(model, candidates)
        assert x.shape == (len(candidates.rows), len(names))
        assert len(rerank(model, score(model, candidates), NO_RULES).items) == 5


def test_a_ranker_reading_collaborative_features_needs_the_models() -> None:
    with pytest.raises(BundleIntegrityError, match="no collaborative models"):
        make_model(features_names=RANKER_FEATURE_NAMES_CF)
