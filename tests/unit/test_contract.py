"""The ranker's feature matrix and the hashing contract, computed by hand."""

from __future__ import annotations

import numpy as np

from serve_app.contract import (
    ITEM_FEATURE_NAMES,
    RANKER_FEATURE_NAMES,
    hash_bucket,
    ranker_features,
    title_tokens,
)


def test_hash_bucket_is_stable_across_processes_and_in_range() -> None:
    # Pinned values: a change here silently breaks every registered bundle.
    assert (
        hash_bucket("u1", 1000)
        == int.from_bytes(__import__("hashlib").blake2b(b"u1", digest_size=8).digest(), "little")
        % 1000
    )
    assert all(0 <= hash_bucket(f"x{i}", 7) < 7 for i in range(100))


def test_title_tokens_lowercase_alphanumeric() -> None:
    assert title_tokens("Red VINTAGE lamp, c3-model #12") == [
        "red",
        "vintage",
        "lamp",
        "c3",
        "model",
        "12",
    ]


def test_ranker_features_by_hand() -> None:
    # 3 items: categories 0, 1, 1; item feature rows are distinct constants.
    item_features = np.arange(3 * len(ITEM_FEATURE_NAMES), dtype=np.float32).reshape(3, -1)
    item_categories = np.array([0, 1, 1])
    candidates = np.array([[2, 0, -1]])  # one user, third slot is padding
    scores = np.array([[0.9, 0.5, 0.0]], dtype=np.float32)
    prefs = np.array([[0.25, 0.75]], dtype=np.float32)
    event_count = np.array([3.0], dtype=np.float32)
    recent = np.array([[2, 3, 0, 0]])  # items 1 and 2 (index + 1): both category 1
    x = ranker_features(
        candidates, scores, item_features, item_categories, prefs, event_count, recent
    )
    assert x.shape == (3, len(RANKER_FEATURE_NAMES))
    col = {name: i for i, name in enumerate(RANKER_FEATURE_NAMES)}
    # candidate item 2 (category 1), rank 0
    assert x[0, col["retrieval_score"]] == np.float32(0.9)
    assert x[0, col["retrieval_rank"]] == 0
    np.testing.assert_array_equal(
        x[0, col["item_log_pop_all"] : col["item_log_price"] + 1], item_features[2]
    )
    assert x[0, col["user_category_affinity"]] == 0.75
    assert x[0, col["user_recent_category_share"]] == 1.0  # both recent items are category 1
    assert x[0, col["user_log_activity"]] == np.float32(np.log1p(3.0))
    assert x[0, col["user_recent_count"]] == 2
    # candidate item 0 (category 0), rank 1
    assert x[1, col["retrieval_rank"]] == 1
    assert x[1, col["user_category_affinity"]] == 0.25
    assert x[1, col["user_recent_category_share"]] == 0.0
    # padding is all zeros
    assert not x[2].any()
