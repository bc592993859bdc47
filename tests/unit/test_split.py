"""Time-based splits: hand-built frames with hand-derived expectations, plus ordering properties."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.split import (
    first_purchase_split,
    global_time_split,
    per_user_last_n_split,
    time_fraction_cutoffs,
)

T0 = pd.Timestamp("2024-01-01", tz="UTC")


def frame(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    """(user, item, minutes after T0) rows, with a `row` column naming each row's input position."""
    return pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "timestamp": [T0 + pd.Timedelta(minutes=r[2]) for r in rows],
            "row": range(len(rows)),
        }
    )


def rows_of(df: pd.DataFrame) -> list[int]:
    return sorted(df["row"].tolist())


def random_events(seed: int, n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    # Few distinct minutes so that ties in time are common.
    return frame(
        [(f"u{rng.integers(12)}", f"i{rng.integers(15)}", int(rng.integers(40))) for _ in range(n)]
    )


def assert_test_never_precedes_train_per_user(train: pd.DataFrame, test: pd.DataFrame) -> None:
    """Per user, every test event is later than every train event, or as late with a later row."""
    for user, user_test in test.groupby("user_id"):
        user_train = train[train["user_id"] == user]
        if user_train.empty:
            continue
        last_train = user_train.sort_values(["timestamp", "row"]).iloc[-1]
        first_test = user_test.sort_values(["timestamp", "row"]).iloc[0]
        assert (last_train["timestamp"], last_train["row"]) < (
            first_test["timestamp"],
            first_test["row"],
        )


def test_global_split_puts_events_at_the_cutoff_after_it() -> None:
    events = frame([("a", "x", 5), ("b", "y", 1), ("a", "z", 3), ("c", "x", 3), ("b", "x", 9)])
    before, after = global_time_split(events, T0 + pd.Timedelta(minutes=3))
    assert rows_of(before) == [1]
    assert rows_of(after) == [0, 2, 3, 4]
    assert before["timestamp"].max() < after["timestamp"].min()


def test_global_split_takes_a_naive_cutoff_as_utc() -> None:
    events = frame([("a", "x", 0), ("a", "y", 120)])
    before, after = global_time_split(events, pd.Timestamp("2024-01-01 01:00"))
    assert rows_of(before) == [0]
    assert rows_of(after) == [1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_split_never_puts_a_test_event_before_a_train_event(seed: int) -> None:
    events = random_events(seed)
    (cutoff,) = time_fraction_cutoffs(events, (0.7,))
    before, after = global_time_split(events, cutoff)
    assert len(before) + len(after) == len(events)
    assert set(before["row"]).isdisjoint(after["row"])
    assert before["timestamp"].max() < after["timestamp"].min()


def test_fraction_cutoffs_are_the_event_times_at_floor_f_times_n() -> None:
    # Ten events at minutes 0..9, stored out of order.
    minutes = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]
    events = frame([("u", "i", m) for m in minutes])
    cutoffs = time_fraction_cutoffs(events, (0.8, 0.9, 0.25))
    # floor(8) -> minute 8, floor(9) -> minute 9, floor(2.5) -> minute 2
    assert cutoffs == [T0 + pd.Timedelta(minutes=m) for m in (8, 9, 2)]
    before, _ = global_time_split(events, cutoffs[0])
    assert len(before) == 8


def test_fraction_cutoff_is_not_shifted_by_floating_point() -> None:
    # 0.29 * 100 is 28.999999999999996 in floating point; 29 events must still fall before.
    events = frame([("u", "i", m) for m in range(100)])
    (cutoff,) = time_fraction_cutoffs(events, (0.29,))
    assert cutoff == T0 + pd.Timedelta(minutes=29)


def test_fraction_cutoffs_reject_bad_input() -> None:
    events = frame([("u", "i", 0)])
    with pytest.raises(ValueError, match="between 0 and 1"):
        time_fraction_cutoffs(events, (1.0,))
    with pytest.raises(ValueError, match="empty"):
        time_fraction_cutoffs(events.iloc[:0])


def test_last_n_split_by_hand() -> None:
    events = frame(
        [
            ("a", "x", 1),  # 0
            ("a", "y", 3),  # 1  a's last
            ("b", "x", 2),  # 2  b has one event: stays in train
            ("a", "z", 2),  # 3  a's second to last
            ("c", "x", 4),  # 4  c: two events at the same minute,
            ("c", "y", 4),  # 5  the later row counts as later
        ]
    )
    train, test = per_user_last_n_split(events, n=1)
    assert rows_of(test) == [1, 5]
    assert rows_of(train) == [0, 2, 3, 4]
    train, test = per_user_last_n_split(events, n=2)
    assert rows_of(test) == [1, 3]  # c has only 2 events (<= n): all in train
    assert rows_of(train) == [0, 2, 4, 5]


@pytest.mark.parametrize(("seed", "n"), [(0, 1), (1, 2), (2, 3)])
def test_last_n_split_never_puts_a_test_event_before_a_train_event(seed: int, n: int) -> None:
    events = random_events(seed)
    train, test = per_user_last_n_split(events, n=n)
    assert len(train) + len(test) == len(events)
    assert set(train["row"]).isdisjoint(test["row"])
    sizes = events["user_id"].value_counts()
    expected_test = sizes[sizes > n].index
    assert test["user_id"].value_counts().sort_index().to_dict() == {
        u: n for u in sorted(expected_test)
    }
    assert_test_never_precedes_train_per_user(train, test)


def test_last_n_split_rejects_n_below_one() -> None:
    with pytest.raises(ValueError, match="n must be"):
        per_user_last_n_split(frame([("a", "x", 0)]), n=0)


def test_first_purchase_split_by_hand() -> None:
    events = frame(
        [
            ("u1", "A", 1),  # 0
            ("u1", "B", 2),  # 1
            ("u1", "A", 3),  # 2  repeat of A: dropped from both sides
            ("u1", "C", 4),  # 3
            ("u2", "G", 5),  # 4  u2's only pair -> test (cold-start test user)
            ("u1", "D", 5),  # 5
            ("u2", "G", 6),  # 6  repeat: dropped
            ("u1", "E", 6),  # 7
            ("u1", "F", 7),  # 8  u1: 6 pairs -> ceil(1.2) = 2 in test: E, F
            ("u3", "P", 9),  # 9  not u3's first P (row 11 is earlier): dropped
            ("u3", "Q", 9),  # 10 u3: 2 pairs (P at 1, Q at 9) -> ceil(0.4) = 1 in test: Q
            ("u3", "P", 1),  # 11 u3's first P, stored last
            ("u4", "X", 2),  # 12 u4: two pairs at the same minute:
            ("u4", "Y", 2),  # 13 the later row is the later pair -> test
        ]
    )
    train, test = first_purchase_split(events, test_fraction=0.2)
    assert rows_of(test) == [4, 7, 8, 10, 13]
    assert rows_of(train) == [0, 1, 3, 5, 11, 12]


def test_first_purchase_split_ceil_is_not_shifted_by_floating_point() -> None:
    # 0.07 * 100 is 7.000000000000001 in floating point: exactly 7 of 100 pairs go to test.
    events = frame([("u", f"i{k}", k) for k in range(100)])
    train, test = first_purchase_split(events, test_fraction=0.07)
    assert rows_of(test) == list(range(93, 100))
    assert len(train) == 93


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_purchase_split_holds_first_pairs_in_time_order(seed: int) -> None:
    events = random_events(seed)
    train, test = first_purchase_split(events, test_fraction=0.2)
    both = pd.concat([train, test])
    pairs = events[["user_id", "item_id"]].drop_duplicates()
    assert len(both) == len(pairs)
    assert not both.duplicated(["user_id", "item_id"]).any()
    # Each kept row is its pair's earliest (time, row).
    earliest = events.sort_values(["timestamp", "row"]).drop_duplicates(["user_id", "item_id"])
    assert rows_of(both) == rows_of(earliest)
    assert_test_never_precedes_train_per_user(train, test)
    per_user = earliest["user_id"].value_counts()
    expected = {u: max(int(np.ceil(0.2 * c - 1e-9)), 1) for u, c in per_user.items()}
    assert test["user_id"].value_counts().to_dict() == expected


def test_first_purchase_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        first_purchase_split(frame([("a", "x", 0)]), test_fraction=0.0)
