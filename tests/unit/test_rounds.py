"""Per-user temporal rounds (#9's protocol inside `recserve train`), checked against hand-made logs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.rounds import BasketRound, all_rounds, basket_round, holdout_round, temporal_rounds

T0 = pd.Timestamp("2024-01-01", tz="UTC")


def frame(
    rows: list[tuple[str, str, float, str]], ratings: list[float] | None = None
) -> pd.DataFrame:
    """(user, item, day, event_type) rows, in that row order."""
    out = pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "timestamp": [T0 + pd.Timedelta(days=r[2]) for r in rows],
            "event_type": [r[3] for r in rows],
        }
    )
    if ratings is not None:
        out["rating"] = ratings
    return out


def test_each_users_newest_fifth_of_first_positives_is_held_out_and_the_log_cut_there() -> None:
    rows = [
        # u1: first positives a (day 1), b (2), c (3), d (4), e (5): 5 pairs -> ceil(1.0) = 1 held out
        ("u1", "a", 1, "purchase"),
        ("u1", "b", 2, "purchase"),
        ("u1", "a", 2.5, "purchase"),  # a repeat: history, not a pair
        ("u1", "c", 3, "purchase"),
        ("u1", "d", 4, "purchase"),
        ("u1", "e", 5, "purchase"),
        ("u1", "a", 6, "purchase"),  # after the cutoff: dropped from the history
        # u2: a view of x first, then a click on x (the pair's time), then y: 2 pairs -> 1 held out
        ("u2", "x", 0, "view"),
        ("u2", "x", 1, "click"),
        ("u2", "y", 7, "click"),
        # u3: one pair only: held out, nothing left (a cold test user)
        ("u3", "z", 3, "purchase"),
    ]
    test = holdout_round(frame(rows), 0.2)
    assert sorted(map(tuple, test.targets[["user_id", "item_id"]].to_numpy())) == [
        ("u1", "e"),
        ("u2", "y"),
        ("u3", "z"),
    ]
    kept = sorted(map(tuple, test.history[["user_id", "item_id"]].to_numpy()))
    assert kept == sorted(
        [("u1", "a"), ("u1", "b"), ("u1", "a"), ("u1", "c"), ("u1", "d"), ("u2", "x"), ("u2", "x")]
    )
    # History comes back in time order.
    assert test.history["timestamp"].is_monotonic_increasing
    assert test.user_ids.tolist() == ["u1", "u2", "u3"]
    index = pd.Index(["a", "b", "c", "d", "e", "x", "y", "z"])
    assert [r.tolist() for r in test.relevant(index, np.array(["u3", "u1"]))] == [[7], [4]]


def test_ties_are_broken_by_row_order_and_the_cut_is_by_position() -> None:
    # u1 buys p, q, r, s, t, v, w, x, y, z; the last two share day 9 (one invoice): ceil(2.0) = 2
    items = list("pqrstvwxyz")
    rows = [("u1", item, min(day, 9), "purchase") for day, item in enumerate(items)]
    test = holdout_round(frame(rows), 0.2)
    assert sorted(test.targets["item_id"]) == ["y", "z"]
    assert test.history["item_id"].tolist() == list("pqrstvwx")
    # 10 pairs, 0.3: ceil(3.0) = 3, not 4, despite 0.3 * 10 = 3.0000000000000004.
    test = holdout_round(frame(rows), 0.3)
    assert sorted(test.targets["item_id"]) == ["x", "y", "z"]


def test_the_validation_round_is_carved_out_of_test_history_only() -> None:
    rows = [("u1", f"i{d}", d, "purchase") for d in range(10)]
    validation, test = temporal_rounds(frame(rows), 0.2)
    assert sorted(test.targets["item_id"]) == ["i8", "i9"]
    # 8 pairs left: ceil(1.6) = 2 held out for validation, 6 history.
    assert sorted(validation.targets["item_id"]) == ["i6", "i7"]
    assert validation.history["item_id"].tolist() == [f"i{d}" for d in range(6)]
    assert not set(validation.history["item_id"]) & set(test.targets["item_id"])


def test_a_ratings_log_counts_only_high_ratings_as_relevant() -> None:
    rows = [("u1", f"m{d}", d, "click") for d in range(5)]
    ratings = [5.0, 4.0, 3.0, 5.0, 3.0]  # the held-out m4 is rated 3: not relevant
    test = holdout_round(frame(rows, ratings), 0.2)
    assert test.targets.empty and test.user_ids.tolist() == []
    assert test.history["item_id"].tolist() == ["m0", "m1", "m2", "m3"]  # the cut stays
    ratings[4] = 4.0
    assert holdout_round(frame(rows, ratings), 0.2).targets["item_id"].tolist() == ["m4"]


def test_fraction_must_be_a_share() -> None:
    with pytest.raises(ValueError, match="fraction"):
        holdout_round(frame([("u", "a", 0, "click")]), 1.0)


def test_ratings_turned_into_weights_count_from_the_weight_of_four_stars() -> None:
    rows = [("u1", f"m{d}", d, "click") for d in range(5)]
    events = frame(rows).assign(weight=[3.0, 2.0, 1.0, 3.0, 1.0])  # m4: 3 stars
    assert holdout_round(events, 0.2, relevant_min_weight=2.0).targets.empty
    assert len(holdout_round(events, 0.2).targets) == 1  # a purchase log: every held-out pair
    events.loc[4, "weight"] = 2.0  # 4 stars
    assert holdout_round(events, 0.2, relevant_min_weight=2.0).targets["item_id"].tolist() == ["m4"]


def orders(rows: list[tuple[str, str, float, str, str]]) -> pd.DataFrame:
    """(user, item, day, event_type, order) rows: `frame` with a session_id per row."""
    out = frame([(r[0], r[1], r[2], r[3]) for r in rows])
    out["session_id"] = [r[4] for r in rows]
    return out


def test_basket_round_puts_the_first_half_of_the_held_out_order_before_the_request() -> None:
    log = orders(
        [
            # u1: order o1 (a, b, c), then o2 (d, e, f, g); 7 pairs, 0.5 -> ceil(3.5) = 4 held: o2
            ("u1", "a", 1, "purchase", "o1"),
            ("u1", "b", 1, "purchase", "o1"),
            ("u1", "c", 1, "purchase", "o1"),
            ("u1", "d", 2, "purchase", "o2"),
            ("u1", "x", 2, "view", "o2"),  # an exposure inside the prefix arrives with it
            ("u1", "e", 2, "purchase", "o2"),
            ("u1", "a", 2, "purchase", "o2"),  # a repeat: not new, not a target
            ("u1", "f", 2, "purchase", "o2"),
            ("u1", "g", 2, "purchase", "o2"),
            # u2: the held-out part starts inside its only order (a, b, c, d): prefix c, rest d
            ("u2", "a", 3, "purchase", "p1"),
            ("u2", "b", 3, "purchase", "p1"),
            ("u2", "c", 3, "purchase", "p1"),
            ("u2", "d", 3, "purchase", "p1"),
            # u3: its held-out order holds one new item: no within-order target
            ("u3", "a", 1, "purchase", "q1"),
            ("u3", "b", 4, "purchase", "q2"),
            # u4: no order ids: no within-order target
            ("u4", "a", 1, "purchase", ""),
            ("u4", "b", 1, "purchase", ""),
        ]
    )
    time_cut = holdout_round(log, 0.5)
    basket = basket_round(log, 0.5)
    # The same history as the time-cutoff round.
    pd.testing.assert_frame_equal(basket.history, time_cut.history)
    assert basket.user_ids.tolist() == ["u1", "u2"]
    targets = basket.targets.groupby("user_id")["item_id"].apply(sorted).to_dict()
    assert targets == {"u1": ["f", "g"], "u2": ["d"]}
    prefix = basket.prefix.groupby("user_id")["item_id"].apply(list).to_dict()
    assert prefix == {"u1": ["d", "x", "e"], "u2": ["c"]}
    seen = basket.history_with_prefix
    assert seen[seen["user_id"] == "u1"]["item_id"].tolist() == list("abcdxe")


def test_basket_round_of_a_log_without_orders_is_empty() -> None:
    log = frame([("u1", item, day, "purchase") for day, item in enumerate("abcde")])
    basket = basket_round(log, 0.4)
    assert basket.targets.empty and basket.prefix.empty
    assert basket.user_ids.tolist() == []


def test_all_rounds_are_the_rounds_each_function_cuts_on_its_own() -> None:
    log = orders(
        [
            (f"u{u}", f"i{(u * 7 + d) % 13}", d // 3, "purchase", f"o{u}-{d // 3}")
            for u in range(4)
            for d in range(12)
        ]
    )
    rounds = all_rounds(log, 0.5)
    validation, test = temporal_rounds(log, 0.5)
    pairs = [
        (rounds.test, test),
        (rounds.validation, validation),
        (rounds.basket_test, basket_round(log, 0.5)),
        (rounds.basket_validation, basket_round(test.history, 0.5)),
    ]
    for got, want in pairs:
        pd.testing.assert_frame_equal(got.history, want.history)
        pd.testing.assert_frame_equal(got.targets, want.targets)
    for got, want in pairs[2:]:
        assert isinstance(got, BasketRound) and isinstance(want, BasketRound)
        pd.testing.assert_frame_equal(got.prefix, want.prefix)
    assert len(rounds.basket_test.user_ids) > 0 and len(rounds.basket_validation.user_ids) > 0
