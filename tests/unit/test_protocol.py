"""Issue 9's protocol on hand-made purchase logs: who is test/validation, what is excluded, metrics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from training.config import load_settings
from training.data import Dataset, normalize_catalog, normalize_events
from training.protocol import (
    FINAL,
    SYSTEMS,
    ProtocolConfig,
    Setting,
    encode_setting,
    evaluate_protocol,
    item_features_as_of,
    merge_candidates,
    protocol_split,
    transition_matrix,
)

T0 = pd.Timestamp("2011-01-03 09:00", tz="UTC")
DAY_MINUTES = 24 * 60


def purchases(rows: list[tuple[str, str, float, str]]) -> pd.DataFrame:
    """(customer, product, minutes after T0, invoice) -> an events frame, row order kept."""
    return pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event_type": "purchase",
            "timestamp": [T0 + pd.Timedelta(minutes=r[2]) for r in rows],
            "position": -1,
            "session_id": [r[3] for r in rows],
            "weight": 1.0,
        }
    )


def pair_set(frame: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(frame["user_id"], frame["item_id"], strict=True))


# a: six distinct products (i1 bought twice), b: two at the same minute, c: a single purchase.
LOG = purchases(
    [
        ("a", "i1", 0, "A1"),
        ("a", "i2", 0, "A1"),
        ("b", "i2", 5, "B1"),
        ("b", "i1", 5, "B1"),  # same minute as b's i2, later row: b's last pair
        ("c", "i3", 7, "C1"),
        ("a", "i3", 10, "A2"),
        ("a", "i4", 20, "A3"),
        ("a", "i1", 25, "A3"),  # a repeat: not a pair of its own
        ("a", "i5", 30, "A4"),
        ("a", "i6", 30, "A4"),
    ]
)


def test_split_holds_out_each_customers_last_fifth_of_first_purchases_twice() -> None:
    split = protocol_split(LOG, test_fraction=0.2)
    # a has 6 pairs: ceil(1.2) = 2 test (i5, i6); of its 4 train pairs ceil(0.8) = 1 is validation.
    # b has 2 pairs at one minute: the later row (i1) is test, i2 train and then validation.
    # c has one pair: test, with no history (the cold-start case).
    assert pair_set(split.test.targets) == {("a", "i5"), ("a", "i6"), ("b", "i1"), ("c", "i3")}
    assert pair_set(split.test.history) == {
        ("a", "i1"),
        ("a", "i2"),
        ("a", "i3"),
        ("a", "i4"),
        ("b", "i2"),
    }
    assert pair_set(split.validation.targets) == {("a", "i4"), ("b", "i2")}
    assert pair_set(split.validation.history) == {("a", "i1"), ("a", "i2"), ("a", "i3")}
    # The repeat purchase of i1 is dropped: the pair keeps its first time.
    a_i1 = split.test.history.query("user_id == 'a' and item_id == 'i1'")["timestamp"]
    assert list(a_i1) == [T0]
    # No pair is ever both history and target of one round.
    for setting in (split.validation, split.test):
        assert not pair_set(setting.history) & pair_set(setting.targets)


def test_encoded_setting_evaluates_every_customer_with_targets_as_of_their_last_pair() -> None:
    split = protocol_split(LOG)
    users = pd.Index(["a", "b", "c"])
    items = pd.Index(["i1", "i2", "i3", "i4", "i5", "i6"])
    test = encode_setting(split.test, users, items)
    assert test.history.toarray().tolist() == [[1, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0], [0] * 6]
    assert test.targets.toarray().tolist() == [
        [0, 0, 0, 0, 1, 1],
        [1, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
    ]
    assert test.users.tolist() == [0, 1, 2]
    t0 = T0.value / 1e9
    assert test.as_of[0] == pytest.approx(t0 + 20 * 60)
    assert test.as_of[1] == pytest.approx(t0 + 5 * 60)
    assert math.isnan(test.as_of[2])
    validation = encode_setting(split.validation, users, items)
    assert validation.users.tolist() == [0, 1]  # c has no validation pair
    # a's pairs in sequence order: i1 then i2 (same minute, row order), then i3.
    assert validation.pair_item.tolist() == [0, 1, 2]


def test_transitions_count_later_lines_of_the_same_invoice_only() -> None:
    history = purchases(
        [
            ("x", "i1", 0, "X1"),
            ("y", "i1", 0, "Y1"),  # another invoice at the same minute, interleaved rows
            ("x", "i2", 0, "X1"),
            ("y", "i3", 0, "Y1"),
            ("x", "i3", 0, "X1"),
            ("x", "i4", 60, "X2"),  # x's next invoice: i3 -> i4 is not a transition
        ]
    )
    enc = encode_setting(
        Setting("t", history, history.iloc[:0]),
        pd.Index(["x", "y"]),
        pd.Index(["i1", "i2", "i3", "i4"]),
    )
    expected = np.zeros((4, 4))
    expected[0, 1] = 1.0  # X1: i1 -> i2 (gap 1)
    expected[1, 2] = 1.0  # X1: i2 -> i3 (gap 1)
    expected[0, 2] = 0.5 + 1.0  # X1: i1 -> i3 (gap 2), Y1: i1 -> i3 (gap 1)
    assert np.allclose(transition_matrix(enc, max_gap=2).toarray(), expected)
    expected[0, 2] = 1.0  # gap 2 no longer counts
    assert np.allclose(transition_matrix(enc, max_gap=1).toarray(), expected)


def test_item_features_count_sales_backwards_from_the_customers_own_as_of_time() -> None:
    day = DAY_MINUTES
    history = purchases(
        [
            ("v1", "i1", 0, "V1"),
            ("v2", "i1", 5 * day, "V2"),
            ("v3", "i1", 9.5 * day, "V3"),
            ("u", "i2", 10 * day, "U1"),  # u's only pair: u is "as of" day 10
            ("v4", "i1", 20 * day, "V4"),  # after u's as-of: only in whole-history popularity
            ("v4", "i3", 20 * day, "V4"),  # first sold after u's as-of: no age
        ]
    )
    users = pd.Index(["u", "v1", "v2", "v3", "v4"])
    enc = encode_setting(
        Setting("t", history, history.iloc[:0]), users, pd.Index(["i1", "i2", "i3"])
    )
    price = np.log1p(np.array([1.0, 2.0, 3.0]))
    f = item_features_as_of(enc, np.array([0]), np.array([[0, 1, 2]]), price)
    assert np.allclose(f["item_log_pop_all"], np.log1p([[4, 1, 1]]))
    assert np.allclose(f["item_log_pop_1d"], np.log1p([[1, 1, 0]]))  # day 9.5; u's own at 10
    assert np.allclose(f["item_log_pop_7d"], np.log1p([[2, 1, 0]]))  # days 5 and 9.5
    assert np.allclose(f["item_log_pop_30d"], np.log1p([[3, 1, 0]]))  # days 0, 5, 9.5
    assert np.allclose(f["item_age_days"][0, :2], [10.0, 0.0])
    assert math.isnan(f["item_age_days"][0, 2])
    assert np.allclose(f["item_log_price"], price[None, :])


def test_merged_candidates_skip_excluded_items_and_follow_the_ordering_score() -> None:
    import scipy.sparse as sp

    inf = -np.inf
    a = np.array([[9, 8, 7, 1, 0, 0], [9, 8, 7, 1, 0, 0]], dtype=np.float64)
    b = np.array([[inf, inf, 5, inf, 6, inf], [inf, inf, 5, inf, inf, inf]])
    exclude = sp.csr_matrix(np.array([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]))
    order_by = np.array([[0, 0.1, 0.3, 0, 0.2, 0], [0, 0, 0.1, 0.5, 0, 0]])
    merged = merge_candidates([a, b], exclude, per_source=2, order_by=order_by)
    # Row 0: a gives {1, 2}, b gives {4, 2}; by order_by: 2 (.3), 4 (.2), 1 (.1).
    # Row 1: a gives {2, 3}, b only {2} (one eligible item); by order_by: 3, 2; then padding.
    assert merged.tolist() == [[2, 4, 1], [3, 2, -1]]


def structured_log(n_customers: int = 160, seed: int = 0) -> Dataset:
    """Four product groups of ten; each customer buys mostly from one group, invoice by invoice.

    Every tenth customer buys a single product once: no history after the split (cold start).
    """
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str, float, str]] = []
    for c in range(n_customers):
        group = c % 4
        minute = float(rng.integers(0, 1_000))
        single = c % 10 == 9
        for invoice in range(1 if single else int(rng.integers(1, 6))):
            size = 1 if single else int(rng.integers(2, 5))
            own = rng.random(size) < 0.9
            products = np.where(
                own, group * 10 + rng.integers(0, 10, size), rng.integers(0, 40, size)
            )
            for p in products:
                rows.append((f"c{c}", f"p{p:02d}", minute, f"c{c}-{invoice}"))
            minute += float(rng.integers(60, 5_000))
    catalog = pd.DataFrame(
        {
            "item_id": [f"p{p:02d}" for p in range(40)],
            "category": [f"g{p // 10}" for p in range(40)],
            "price": 1.0 + np.arange(40) % 7,
            "title": [f"thing {p // 10} variant {p % 10}" for p in range(40)],
            "created_at": T0,
        }
    )
    return Dataset("structured", normalize_events(purchases(rows)), normalize_catalog(catalog))


def hand_split(events: pd.DataFrame) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The issue's split written out per customer: (train products, test products)."""
    train: dict[str, list[str]] = {}
    test: dict[str, list[str]] = {}
    for user, rows in events.groupby("user_id", sort=False):
        firsts: list[str] = []
        for item in rows.sort_values("timestamp", kind="stable")["item_id"]:
            if item not in firsts:
                firsts.append(item)
        n_test = max(1, math.ceil(0.2 * len(firsts) - 1e-9))
        train[str(user)], test[str(user)] = firsts[:-n_test], firsts[-n_test:]
    return train, test


def test_tiny_run_excludes_train_products_and_scores_popularity_as_computed_by_hand() -> None:
    dataset = structured_log()
    settings = load_settings(register_bundle=False)
    settings.two_tower = settings.two_tower.model_copy(
        update={"hidden_dim": 16, "embedding_dim": 8, "batch_size": 128, "threads": 1}
    )
    settings.ranker = settings.ranker.model_copy(update={"max_rounds": 30, "threads": 1})
    config = ProtocolConfig(
        ks=(10, 20),
        ease_lambdas=(5.0, 50.0),
        knn_neighbors=(5,),
        recency_days=(30.0,),
        two_tower_temperatures=(0.2,),
        two_tower_epochs=2,
        candidates_per_source=10,
        ranker_depths=(2,),
    )
    result = evaluate_protocol(dataset, settings, config)
    assert list(result.metrics) == list(SYSTEMS)

    train, test = hand_split(dataset.events)
    assert sorted(result.user_ids) == sorted(test)  # every customer has >= 1 test product
    index = {item: i for i, item in enumerate(result.item_ids)}
    for system, lists in result.rankings.items():
        assert lists.shape == (len(result.user_ids), 20)
        for user, row in zip(result.user_ids, lists, strict=True):
            items = [result.item_ids[i] for i in row if i >= 0]
            assert not set(items) & set(train[user]), (system, user)
            assert len(items) == len(set(items))
            # 40 products: every list is full unless the customer bought more than 20 of them.
            assert len(items) == min(20, 40 - len(train[user])), (system, user)

    # Popularity by hand: distinct training customers per product, ties by catalog order.
    counts = {item: 0 for item in result.item_ids}
    for items in train.values():
        for item in items:
            counts[item] += 1
    order = sorted(result.item_ids, key=lambda item: (-counts[item], index[item]))
    gains = []
    for user in result.user_ids:
        top = [item for item in order if item not in train[user]][:10]
        dcg = sum(1 / math.log2(r + 2) for r, item in enumerate(top) if item in test[user])
        ideal = sum(1 / math.log2(r + 2) for r in range(min(10, len(test[user]))))
        gains.append(dcg / ideal)
    assert result.metrics["popularity"]["ndcg@10"] == pytest.approx(np.mean(gains))

    # Customers with no history get the popularity list in every system (the cold-start path).
    cold = [u for u, row in enumerate(result.user_ids) if not train[row]]
    assert cold, "the log should contain single-purchase customers"
    for lists in result.rankings.values():
        assert np.array_equal(lists[cold], result.rankings["popularity"][cold])
    # The planted groups are found: recserve's final ranking beats popularity clearly.
    assert result.metrics[FINAL]["ndcg@10"] > 2 * result.metrics["popularity"]["ndcg@10"]
