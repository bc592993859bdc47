"""Offline evaluation splits: time-based train/test partitions of an events frame, never random.

Every split keeps the input's columns and rows unchanged (no re-sorting of the returned frames
beyond what is stated) and breaks ties in time by the original row order, so a split is a pure
function of the frame. A random split would leak the future into training; these cannot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

# Products like 0.29 * 100 land a hair off the integer in floating point; without this slack
# floor/ceil would move one event across the boundary.
_ROUNDING_SLACK = 1e-9


def _check_columns(events: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in events.columns]
    if missing:
        raise ValueError(f"events frame lacks column(s) {missing}")


def _utc_timestamps(events: pd.DataFrame) -> pd.Series:
    # Naive times are taken as UTC, as in `serve_app.schemas.Event`.
    return pd.to_datetime(events["timestamp"], utc=True)


def _utc_cutoff(cutoff: pd.Timestamp) -> pd.Timestamp:
    cutoff = pd.Timestamp(cutoff)
    return cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff.tz_convert("UTC")


def _time_order(events: pd.DataFrame) -> np.ndarray:
    """Row positions sorted by time; a stable sort keeps equal times in their original row order."""
    ns = _utc_timestamps(events).to_numpy(dtype="datetime64[ns]").astype(np.int64)
    return np.argsort(ns, kind="stable")


def global_time_split(
    events: pd.DataFrame, cutoff: pd.Timestamp
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split at one instant: `before` holds events with timestamp < cutoff, `after` the rest (>=).

    A naive `cutoff` is taken as UTC. Both halves keep the input's row order and index.
    """
    _check_columns(events, ["timestamp"])
    before = (_utc_timestamps(events) < _utc_cutoff(cutoff)).to_numpy()
    return events.loc[before], events.loc[~before]


def time_fraction_cutoffs(
    events: pd.DataFrame, fractions: Sequence[float] = (0.8, 0.9)
) -> list[pd.Timestamp]:
    """Cutoff instants at the given fractions of the events, for `global_time_split`.

    For a fraction f of n events the cutoff is the time of the event at sorted position
    floor(f * n) (0-based), so with distinct times exactly floor(f * n) events fall strictly before
    it (fewer when several events share the cutoff time). Returned in the order of `fractions`, as
    UTC timestamps.
    """
    _check_columns(events, ["timestamp"])
    if len(events) == 0:
        raise ValueError("cannot compute time cutoffs of an empty events frame")
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise ValueError(f"fractions must lie strictly between 0 and 1, got {f}")
    ordered = np.sort(_utc_timestamps(events).to_numpy(dtype="datetime64[ns]"))
    n = len(ordered)
    return [
        pd.Timestamp(ordered[min(math.floor(f * n + _ROUNDING_SLACK), n - 1)]).tz_localize("UTC")
        for f in fractions
    ]


def per_user_last_n_split(events: pd.DataFrame, n: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Leave-last-n-out: each user's last `n` events by time go to test, the rest to train.

    Users with <= n events keep all of them in train (they would have no history to predict from).
    Equal times are ordered by row order, so of two simultaneous events the later row is "later".
    Both halves keep the input's row order and index.
    """
    _check_columns(events, ["user_id", "timestamp"])
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    order = _time_order(events)
    users = events["user_id"].to_numpy()[order]
    by_user = pd.Series(users).groupby(users, sort=False)
    from_end = by_user.cumcount(ascending=False).to_numpy()  # 0 = the user's last event
    size = by_user.transform("size").to_numpy()
    is_test = np.zeros(len(events), dtype=bool)
    is_test[order] = (from_end < n) & (size > n)
    return events.loc[~is_test], events.loc[is_test]


def first_purchase_split(
    events: pd.DataFrame, test_fraction: float = 0.2
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-user temporal split of first interactions, the protocol for repeat-heavy purchase logs.

    1. Keep only the first event (by time, then row order) of each (user, item) pair, so a test
       item is always new to the user and repeats never inflate the metrics.
    2. Per user, order those pairs by time; the last ceil(test_fraction * pairs) (at least 1) go to
       test, the rest to train. A user with 2 pairs therefore has 1 + 1, with 6 pairs 4 + 2.
    3. A user with a single pair puts it in test and has nothing in train: such users are kept on
       purpose as the cold-start test population (evaluate them with a cold-start path, or drop
       them by filtering test on train's users).

    Both halves are subsets of the deduplicated rows in the input's row order, index kept.
    """
    _check_columns(events, ["user_id", "item_id", "timestamp"])
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    order = _time_order(events)
    ordered = events.iloc[order]
    first = ~ordered.duplicated(subset=["user_id", "item_id"], keep="first").to_numpy()
    kept_order = order[first]  # positions of first events, in time order
    users = events["user_id"].to_numpy()[kept_order]
    by_user = pd.Series(users).groupby(users, sort=False)
    from_end = by_user.cumcount(ascending=False).to_numpy()
    size = by_user.transform("size").to_numpy()
    n_test = np.maximum(np.ceil(test_fraction * size - _ROUNDING_SLACK), 1)
    keep = np.zeros(len(events), dtype=bool)
    keep[kept_order] = True
    is_test = np.zeros(len(events), dtype=bool)
    is_test[kept_order] = from_end < n_test
    return events.loc[keep & ~is_test], events.loc[is_test]
