"""Point-in-time user states and training rows, checked against a log worked out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.data import normalize_events
from training.features import encode_log, item_stats_at, training_rows, user_states_at

T0 = pd.Timestamp("2026-01-01", tz="UTC")
# items i0, i1 in category 0; i2, i3 in category 1
ITEMS = pd.Index(["i0", "i1", "i2", "i3"])
CATS = np.array([0, 0, 1, 1])


def _log():
    rows = [
        ("u1", "i0", "view", 1),
        ("u1", "i0", "click", 2),  # weight 1, category 0
        ("u1", "i2", "purchase", 3),  # weight 3, category 1
        ("u1", "i0", "click", 4),  # repeat of i0: counts, but is not a new first positive
        ("u2", "i3", "click", 5),
        ("u1", "i1", "click", 6),
        ("u1", "gone", "click", 7),  # item not in the catalog: dropped
    ]
    frame = pd.DataFrame(
        [
            {"user_id": u, "item_id": i, "event_type": t, "timestamp": T0 + pd.Timedelta(days=d)}
            for u, i, t, d in rows
        ]
    )
    return encode_log(normalize_events(frame), ITEMS, CATS, 2)


def test_user_state_counts_positives_and_lists_distinct_recent_items_newest_first() -> None:
    log = _log()
    states = user_states_at(log, np.array(["u1", "u2", "u9"]), T0 + pd.Timedelta(days=5.5), 3)
    # u1 before day 5.5: click i0 (c0, w1), purchase i2 (c1, w3), click i0 (c0, w1)
    assert states.event_count.tolist() == [3.0, 1.0, 0.0]
    np.testing.assert_allclose(states.category_prefs[0], [2 / 5, 3 / 5])
    np.testing.assert_allclose(states.category_prefs[1], [0.0, 1.0])
    np.testing.assert_allclose(states.category_prefs[2], [0.0, 0.0])
    assert states.recent_items.tolist() == [[3, 1, 0], [4, 0, 0], [0, 0, 0]]  # index + 1
    assert states.seen.toarray().tolist() == [[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    np.testing.assert_allclose(states.profile()[0], [np.log1p(3), 0.4, 0.6], rtol=1e-6)


def test_training_rows_see_only_the_past_of_each_event() -> None:
    log = _log()
    position = np.full(len(log.ts), -1)
    rows = training_rows(log, position, np.ones(len(log.ts), dtype=bool), 3)
    # first positives in time order: (u1,i0,d2) (u1,i2,d3) (u2,i3,d5) (u1,i1,d6)
    assert rows.user_ids.tolist() == ["u1", "u1", "u2", "u1"]
    assert rows.item.tolist() == [0, 2, 3, 1]
    assert rows.recent.tolist() == [[0, 0, 0], [1, 0, 0], [0, 0, 0], [3, 1, 0]]
    expected_counts = [0, 1, 0, 3]
    np.testing.assert_allclose(rows.profile()[:, 0], np.log1p(expected_counts), rtol=1e-6)
    np.testing.assert_allclose(rows.profile()[1, 1:], [1.0, 0.0])
    np.testing.assert_allclose(rows.profile()[3, 1:], [0.4, 0.6])
    np.testing.assert_allclose(rows.weight, [1.0, 3.0, 1.0, 1.0])


def test_the_state_before_an_event_equals_the_state_at_its_time() -> None:
    """Training rows and evaluation states are the same definition: no train/eval skew."""
    log = _log()
    rows = training_rows(log, np.full(len(log.ts), -1), np.ones(len(log.ts), dtype=bool), 3)
    at = user_states_at(log, np.array(["u1"]), T0 + pd.Timedelta(days=6), 3)
    np.testing.assert_allclose(rows.profile()[3], at.profile()[0], rtol=1e-6)
    assert rows.recent[3].tolist() == at.recent_items[0].tolist()


def test_item_stats_windows() -> None:
    log = _log()
    stats = item_stats_at(log, T0 + pd.Timedelta(days=5.5), np.full(4, T0.value))
    assert stats.pop_all.tolist() == [2.0, 0.0, 3.0, 1.0]
    # 1-day window: only the click on i3 at day 5
    assert stats.pop_1d.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert stats.age_days.tolist() == pytest.approx([5.5] * 4)


def test_tail_labels_are_each_users_newest_items_with_the_state_just_before_them() -> None:
    from training.labels import tail_window

    log = _log()
    types = np.array(["view", "click", "purchase", "click", "click", "click"])
    end = T0 + pd.Timedelta(days=10)
    # u1's first positives: i0 (day 2), i2 (day 3), i1 (day 6); u2 has one only: no labels.
    window, history = tail_window(log, end, 0.2, 3, types)  # ceil(0.6) = 1 label
    assert window.states.user_ids.tolist() == ["u1"]
    assert window.grades.toarray().tolist() == [[0, 1, 0, 0]]  # i1, a click
    assert window.states.seen.toarray().tolist() == [[1, 0, 1, 0]]
    assert window.states.event_count.tolist() == [3.0]  # the repeat click on day 4 counts
    # Everything but the label event stays for item statistics and the collaborative models.
    assert history.ts.tolist() == log.ts[log.ts != (T0 + pd.Timedelta(days=6)).value].tolist()

    window, history = tail_window(log, end, 0.5, 3, types)  # ceil(1.5) = 2 labels
    # i2 (a purchase: grade 3) and i1; the state stops before day 3, so the day-4 repeat of i0
    # is neither history nor (already seen) a label.
    assert window.grades.toarray().tolist() == [[0, 1, 3, 0]]
    assert window.states.seen.toarray().tolist() == [[1, 0, 0, 0]]
    assert window.states.recent_items.tolist() == [[1, 0, 0]]
    assert sorted(set(log.user[~np.isin(log.ts, history.ts)].tolist())) == [0]  # u1's only
    assert len(history.ts) == 3  # u1: view i0, click i0; u2: click i3

    # A cut before day 3 leaves u1 with one first positive: nobody is labelled.
    window, _ = tail_window(log, T0 + pd.Timedelta(days=2.5), 0.2, 3, types)
    assert window.states.user_ids.tolist() == []


def test_sessions_are_per_user_and_a_row_without_one_has_none() -> None:
    t = pd.Timestamp("2024-01-01", tz="UTC")
    events = pd.DataFrame(
        {
            "user_id": ["a", "a", "b", "b", "a"],
            "item_id": ["x", "y", "x", "y", "x"],
            "timestamp": [t] * 5,
            "event_type": ["purchase"] * 5,
            "weight": 1.0,
            "session_id": ["1", "1", "1", "", "2"],
        }
    )
    log = encode_log(events, pd.Index(["x", "y"]), np.zeros(2, dtype=np.int64), 1)
    assert log.session is not None and log.session.tolist() == [0, 0, 1, -1, 2]
    assert (
        encode_log(events.drop(columns="session_id"), pd.Index(["x", "y"]), np.zeros(2), 1).session
        is None
    )
