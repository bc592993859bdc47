"""Baselines on hand-sized matrices: popularity counts, kNN and EASE weights, planted blocks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from training.baselines import (
    CatalogTooLargeError,
    EASERecommender,
    ItemKNNRecommender,
    PopularityRecommender,
    RecentPopularityRecommender,
    tune_ease_lambda,
)
from training.evaluate import hit_rate_at_k, ndcg_at_k, relevance_matrix

BLOCK_USERS, BLOCK_ITEMS, PER_USER = 30, 10, 6


def planted_blocks(seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Two disjoint blocks: users 0..29 touch only items 0..9, users 30..59 only items 10..19.

    Each user has 6 random items of their block; one of them is held out. Returns (train matrix,
    held-out item per user, block of each item).
    """
    rng = np.random.default_rng(seed)
    rows, cols, held_out = [], [], []
    for user in range(2 * BLOCK_USERS):
        block = user // BLOCK_USERS
        items = block * BLOCK_ITEMS + rng.choice(BLOCK_ITEMS, size=PER_USER, replace=False)
        held_out.append(items[-1])
        rows += [user] * (PER_USER - 1)
        cols += items[:-1].tolist()
    train = sp.csr_matrix(
        (np.ones(len(rows)), (rows, cols)), shape=(2 * BLOCK_USERS, 2 * BLOCK_ITEMS)
    )
    return train, np.array(held_out), np.repeat([0, 1], BLOCK_ITEMS)


def test_popularity_order_matches_hand_counts() -> None:
    x = sp.csr_matrix(np.array([[1, 0, 2, 0], [1, 1, 0, 0], [0, 0, 1, 0]], dtype=float))
    # Weight sums per item: 2, 1, 3, 0 -> order 2, 0, 1, 3.
    by_weight = PopularityRecommender().fit(x)
    assert by_weight.recommend(np.array([0, 1]), 4).tolist() == [[2, 0, 1, 3]] * 2
    assert by_weight.score(np.array([2])).tolist() == [[2.0, 1.0, 3.0, 0.0]]
    # Distinct users per item: 2, 1, 2, 0 -> 0 and 2 tie (lower index first), then 1, 3.
    by_count = PopularityRecommender(use_weights=False).fit(x)
    assert by_count.recommend(np.array([0]), 4).tolist() == [[0, 2, 1, 3]]
    # Excluding each user's own items: u0 saw 0, 2 -> [1, 3]; u2 saw 2 -> [0, 1, 3].
    assert by_weight.recommend(np.array([0, 2]), 3, exclude=x).tolist() == [
        [1, 3, -1],
        [0, 1, 3],
    ]


def test_recent_popularity_decays_and_windows_events() -> None:
    now = pd.Timestamp("2024-05-10T00:00:00Z")
    day = pd.Timedelta("1D")
    items = np.array([0, 1, 1, 2, 3])
    times = pd.Series([now, now - day, now - 3 * day, now - day / 2, now + day])
    weights = np.array([1.0, 3.0, 5.0, 1.0, 9.0])
    model = RecentPopularityRecommender(window="2D", half_life="1D").fit_events(
        items, times, weights, now=now, n_items=4
    )
    # item 0: 1 * 2^0 = 1; item 1: 3 * 2^-1 = 1.5 (the 3-day-old event is outside the window);
    # item 2: 1 * 2^-0.5 ≈ 0.7071; item 3: its only event is after `now` -> 0.
    assert model.score(np.array([0]))[0] == pytest.approx([1.0, 1.5, 2**-0.5, 0.0])
    assert model.recommend(np.array([0]), 4).tolist() == [[1, 0, 2, 3]]
    # Without decay or window, plain sums of the events up to now: 1, 8, 1, 0.
    plain = RecentPopularityRecommender(window=None, half_life=None)
    plain.fit(sp.csr_matrix((1, 4)), item_idx=items, timestamps=times, weights=weights, now=now)
    assert plain.score(np.array([0]))[0].tolist() == [1.0, 8.0, 1.0, 0.0]


def test_item_knn_keeps_top_neighbours_of_shrunk_cosine() -> None:
    x = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=float))
    # norms: item0 √3, item1 √3, item2 √2. With shrink 1:
    # sim(0,1) = 2 / (3 + 1) = 0.5; sim(0,2) = 2 / (√6 + 1); sim(1,2) = 1 / (√6 + 1).
    s02 = 2 / (math.sqrt(6) + 1)
    model = ItemKNNRecommender(k_neighbors=1, shrink=1.0).fit(x)
    # One neighbour per target item: item0 <- item2, item1 <- item0, item2 <- item0.
    expected = np.array([[0.0, 0.5, s02], [0.0, 0.0, 0.0], [s02, 0.0, 0.0]])
    assert model.similarity_ is not None
    assert model.similarity_.toarray() == pytest.approx(expected)
    # u0 holds items 0 and 1: score = row 0 + row 1 of the neighbour matrix.
    assert model.score(np.array([0]))[0] == pytest.approx([0.0, 0.5, s02])


def test_item_knn_keeps_at_most_k_neighbours_per_item() -> None:
    train, _, _ = planted_blocks()
    model = ItemKNNRecommender(k_neighbors=3, shrink=0.0).fit(train)
    assert model.similarity_ is not None
    per_item = np.diff(sp.csc_matrix(model.similarity_).indptr)
    assert per_item.max() == 3
    assert model.similarity_.diagonal().max() == 0.0


def test_ease_matches_the_closed_form_and_per_column_ridge() -> None:
    x = np.array(
        [[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 1], [0, 0, 1, 1]], dtype=float
    )
    lam = 2.0
    model = EASERecommender(lam=lam).fit(sp.csr_matrix(x))
    p = np.linalg.inv(x.T @ x + lam * np.eye(4))
    direct = np.eye(4) - p @ np.diag(1.0 / np.diag(p))
    assert model.weights_ == pytest.approx(direct, abs=1e-12)
    assert np.diag(direct) == pytest.approx(np.zeros(4), abs=1e-12)
    # Independent check of what EASE means: column j is the ridge regression of item j on the
    # other items, b = (X_-j^T X_-j + lam I)^-1 X_-j^T x_j.
    for j in range(4):
        others = np.delete(np.arange(4), j)
        xo = x[:, others]
        ridge = np.linalg.solve(xo.T @ xo + lam * np.eye(3), xo.T @ x[:, j])
        assert model.weights_ is not None
        assert model.weights_[others, j] == pytest.approx(ridge, abs=1e-12)
    assert model.score(np.arange(5)) == pytest.approx(x @ direct, abs=1e-12)


def test_ease_refuses_catalogs_above_the_cap() -> None:
    with pytest.raises(CatalogTooLargeError, match="max_items=3"):
        EASERecommender(max_items=3).fit(sp.csr_matrix(np.ones((2, 4))))


# EASE at a small lambda (0.1-10 here) gives some in-block items negative partial-correlation
# weights, so they fall below the out-of-block zeros; lambda 50 is in the range `tune_ease_lambda`
# picks for data of this size.
@pytest.mark.parametrize(
    "model", [ItemKNNRecommender(k_neighbors=20, shrink=5.0), EASERecommender(lam=50.0)]
)
def test_knn_and_ease_stay_in_block_and_beat_popularity(
    model: ItemKNNRecommender | EASERecommender,
) -> None:
    train, held_out, item_block = planted_blocks()
    users = np.arange(train.shape[0])
    user_block = users // BLOCK_USERS
    model.fit(train)
    # Each user has exactly 5 unseen items in their block: all 5 must come first.
    ranked = model.recommend(users, 5, exclude=train)
    assert (item_block[ranked] == user_block[:, None]).all()
    relevant = [np.array([item]) for item in held_out]
    # The held-out item is one of those 5, so the in-block models find it for every user; popularity
    # has to pick 5 of 15 unseen items with no idea of the block (about 1/3 by chance).
    model_hits = hit_rate_at_k(ranked, relevant, 5)
    popular = PopularityRecommender().fit(train).recommend(users, 5, exclude=train)
    popular_hits = hit_rate_at_k(popular, relevant, 5)
    assert model_hits == 1.0
    assert popular_hits < 0.6
    assert model_hits - popular_hits > 0.4


@pytest.mark.parametrize(
    "model",
    [
        PopularityRecommender(),
        ItemKNNRecommender(k_neighbors=5, shrink=1.0),
        EASERecommender(lam=10.0),
    ],
)
def test_excluded_items_never_appear(
    model: PopularityRecommender | ItemKNNRecommender | EASERecommender,
) -> None:
    rng = np.random.default_rng(1)
    train = sp.random(40, 30, density=0.15, random_state=2, format="csr")
    exclude = sp.random(40, 30, density=0.5, random_state=3, format="csr")
    model.fit(train)
    users = rng.permutation(40)[:25]
    ranked = model.recommend(users, 30, exclude=exclude)
    dense_exclude = exclude.toarray() != 0
    for row, user in enumerate(users):
        items = ranked[row][ranked[row] >= 0]
        assert not dense_exclude[user, items].any()
        # Everything not excluded is listed once: the lists are complete and padded at the end.
        assert sorted(items.tolist()) == np.flatnonzero(~dense_exclude[user]).tolist()
        assert (ranked[row][len(items) :] == -1).all()


@pytest.mark.parametrize(
    "model", [ItemKNNRecommender(k_neighbors=5, shrink=1.0), EASERecommender(lam=10.0)]
)
def test_users_without_history_get_popularity(model: ItemKNNRecommender | EASERecommender) -> None:
    train = sp.lil_matrix((3, 5))
    train[0, 1] = train[0, 3] = train[1, 3] = train[1, 4] = 1.0
    train[1, 1] = 2.0
    # user 2 has no history; item weights: 1 -> 3, 3 -> 2, 4 -> 1, others 0.
    model.fit(train.tocsr())
    assert model.recommend(np.array([2]), 5).tolist() == [[1, 3, 4, 0, 2]]


def test_tune_ease_lambda_reports_ndcg_per_lambda() -> None:
    train, held_out, _ = planted_blocks()
    n_users = train.shape[0]
    valid = relevance_matrix([np.array([i]) for i in held_out], n_items=train.shape[1])
    lambdas = [1.0, 50.0, 1e4]
    best, scores = tune_ease_lambda(train, valid, lambdas, k=10)
    assert list(scores) == lambdas
    assert best == max(lambdas, key=lambda lam: scores[lam])
    # Recompute one lambda directly: closed form in numpy, seen items masked, full sort.
    x = train.toarray()
    p = np.linalg.inv(x.T @ x + 50.0 * np.eye(x.shape[1]))
    scores_50 = x @ (np.eye(x.shape[1]) - p / np.diag(p)[None, :])
    scores_50[x > 0] = -np.inf
    ranked = np.argsort(-scores_50, axis=1, kind="stable")[:, :10]
    assert scores[50.0] == pytest.approx(ndcg_at_k(ranked, valid[np.arange(n_users)], 10))
    # Every validation item is in the user's block and the model ranks only in-block items
    # first, so NDCG is high whatever lambda.
    assert min(scores.values()) > 0.3
