"""Per-user temporal rounds (the protocol of #9): what `recserve train` chooses settings on and reports.

Each user's first positive interaction with each item, in time order (ties: row order); the newest
`fraction` of them (ceil, at least 1) are held out. The round's history is the raw log cut at each
user's own cutoff, the position of their first held-out pair: repeats, views and every event of other
users before it stay, nothing of theirs from that moment on. Relevant = the held-out items (rating >= 4
when the log has ratings). The validation round is carved the same way out of the test round's history,
so no choice made on it ever reads a test item.

Beside it, the within-order round (`basket_round`, #32): the same history, but the first half of each
user's first held-out order (`session_id`) arrives before the request, as a shopper's cart does, and
only the rest of that order is relevant. It measures basket completion, which the time cut cannot
(whole orders fall on its far side, unseen).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from serve_app.schemas import POSITIVE_EVENT_TYPES

# A ratings log (`rating` column, MovieLens): only ratings this high count as relevant when held out.
MIN_RELEVANT_RATING = 4.0
# Products like 0.2 * 10 land a hair off the integer in floating point.
_ROUNDING_SLACK = 1e-9


@dataclass(frozen=True)
class Round:
    """One round: the log models learn from and the held-out items they should find."""

    name: str
    history: pd.DataFrame  # events before each user's cutoff, in time order (ties: row order)
    targets: pd.DataFrame  # held-out relevant first interactions: user_id, item_id, timestamp

    @property
    def user_ids(self) -> np.ndarray:
        """The evaluated users (at least one relevant held-out item), sorted."""
        return np.sort(self.targets["user_id"].astype(str).unique())

    def relevant(self, item_index: pd.Index, user_ids: np.ndarray) -> list[np.ndarray]:
        """Held-out catalog rows per user of `user_ids` (unknown items dropped)."""
        rows = item_index.get_indexer(pd.Index(self.targets["item_id"]))
        frame = pd.DataFrame({"user_id": self.targets["user_id"].astype(str), "row": rows})
        frame = frame[frame["row"] >= 0]
        by_user = frame.groupby("user_id")["row"].apply(lambda r: np.unique(r.to_numpy()))
        empty = np.zeros(0, dtype=np.int64)
        return [by_user.get(u, empty).astype(np.int64) for u in user_ids]


def time_ordered(events: pd.DataFrame) -> pd.DataFrame:
    """Events sorted by time, ties kept in row order."""
    ns = pd.to_datetime(events["timestamp"], utc=True).to_numpy(dtype="datetime64[ns]")
    return events.iloc[np.argsort(ns.astype(np.int64), kind="stable")]


@dataclass(frozen=True)
class _Cut:
    """A log in time order, the rows of its held-out pairs and each user's cutoff position."""

    ordered: pd.DataFrame  # reset index: row number = position
    held: np.ndarray  # positions of the held-out first positive pairs, time order
    limit: np.ndarray  # per row: its user's cutoff position (len(ordered) when none)

    @cached_property  # one frame, shared by the cut's time-cutoff and within-order rounds
    def history(self) -> pd.DataFrame:
        return self.ordered.loc[np.arange(len(self.ordered)) < self.limit]


def _cut(events: pd.DataFrame, fraction: float) -> _Cut:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
    ordered = time_ordered(events).reset_index(drop=True)
    positive = ordered["event_type"].isin(POSITIVE_EVENT_TYPES).to_numpy()
    # Each pair's first *positive* row (a view before it is an exposure, not an interaction).
    pos_rows = np.flatnonzero(positive)
    pos = ordered.iloc[pos_rows]
    first = np.zeros(len(ordered), dtype=bool)
    first[pos_rows[~pos.duplicated(subset=["user_id", "item_id"], keep="first").to_numpy()]] = True
    pair_rows = np.flatnonzero(first)  # time order
    users = ordered["user_id"].to_numpy()[pair_rows]
    by_user = pd.Series(users).groupby(users, sort=False)
    from_end = by_user.cumcount(ascending=False).to_numpy()
    size = by_user.transform("size").to_numpy()
    n_test = np.maximum(np.ceil(fraction * size - _ROUNDING_SLACK), 1)
    held = pair_rows[from_end < n_test]
    # Each user's cutoff: the position of their first held-out pair.
    cutoff = pd.Series(held).groupby(ordered["user_id"].to_numpy()[held]).min()
    limit = ordered["user_id"].map(cutoff).fillna(len(ordered)).to_numpy()
    return _Cut(ordered, held, limit)


def _relevant_only(targets: pd.DataFrame, relevant_min_weight: float | None) -> pd.DataFrame:
    if "rating" in targets.columns:
        return targets[targets["rating"].to_numpy() >= MIN_RELEVANT_RATING]
    if relevant_min_weight is not None:
        return targets[targets["weight"].to_numpy() >= relevant_min_weight]
    return targets


def holdout_round(
    events: pd.DataFrame,
    fraction: float = 0.2,
    name: str = "test",
    relevant_min_weight: float | None = None,
) -> Round:
    """Hold out each user's newest `fraction` of first positive interactions (see the module).

    Relevant: every held-out pair, or with a `rating` column those rated >= 4, or with
    `relevant_min_weight` those whose event weight is at least that (a ratings log whose ratings
    became weights, `training.movielens`: weight 2 = rating 4).
    """
    return _time_round(_cut(events, fraction), name, relevant_min_weight)


def _time_round(cut: _Cut, name: str, relevant_min_weight: float | None) -> Round:
    targets = _relevant_only(cut.ordered.iloc[cut.held], relevant_min_weight)
    return Round(name, cut.history, targets[["user_id", "item_id", "timestamp"]])


@dataclass(frozen=True)
class BasketRound(Round):
    """The within-order round: a shopper with part of an order in the cart. `history` is the
    time-cutoff round's; `prefix` holds, per user, their events from the cutoff through the first
    half of the first held-out order's new items (what arrives as events before the request);
    `targets` are the rest of that order's new items."""

    prefix: pd.DataFrame

    @property
    def history_with_prefix(self) -> pd.DataFrame:
        """The log a request sees once the prefix events have arrived (time order kept)."""
        return pd.concat([self.history, self.prefix], ignore_index=True)


def basket_round(
    events: pd.DataFrame,
    fraction: float = 0.2,
    name: str = "basket-test",
    relevant_min_weight: float | None = None,
) -> BasketRound:
    """The within-order hold-out beside `holdout_round(events, fraction)`, with the same history.

    For each user, the order (`session_id`) of their first held-out pair; its held-out new items in
    log order, when there are at least two: the first half (floor, at least one) joins the prefix,
    the rest is relevant (ratings / weights filtered as in `holdout_round`). Users whose order has one
    new item, and logs without sessions, contribute no target: the round is then empty.
    """
    return _basket_round(_cut(events, fraction), name, relevant_min_weight)


def _basket_round(cut: _Cut, name: str, relevant_min_weight: float | None) -> BasketRound:
    held = cut.ordered.iloc[cut.held]
    session = (
        held["session_id"].fillna("").astype(str)
        if "session_id" in held.columns
        else pd.Series("", index=held.index)
    )
    users = held["user_id"].to_numpy()
    first_session = session.groupby(users, sort=False).transform("first")
    in_order = (session == first_session) & (session != "")
    order = held[in_order.to_numpy()]
    order_users = order["user_id"].to_numpy()
    nth = pd.Series(order_users).groupby(order_users, sort=False).cumcount().to_numpy()
    size = pd.Series(order_users).groupby(order_users, sort=False).transform("size").to_numpy()
    n_prefix = np.maximum(size // 2, 1)
    eligible = size >= 2
    in_prefix = eligible & (nth < n_prefix)
    rest = order[eligible & (nth >= n_prefix)]
    # Everything of the user from the cutoff through their last prefix item arrives first.
    last_prefix = pd.Series(order.index[in_prefix]).groupby(order_users[in_prefix]).max()
    position = np.arange(len(cut.ordered))
    through = cut.ordered["user_id"].map(last_prefix).fillna(-1).to_numpy()
    prefix = cut.ordered.loc[(position >= cut.limit) & (position <= through)]
    targets = _relevant_only(rest, relevant_min_weight)
    return BasketRound(name, cut.history, targets[["user_id", "item_id", "timestamp"]], prefix)


def temporal_rounds(
    events: pd.DataFrame, fraction: float = 0.2, relevant_min_weight: float | None = None
) -> tuple[Round, Round]:
    """(validation, test): test held out of the whole log, validation out of test's history."""
    test = holdout_round(events, fraction, "test", relevant_min_weight)
    return holdout_round(test.history, fraction, "validation", relevant_min_weight), test


@dataclass(frozen=True)
class Rounds:
    """Every round `recserve train` reads, from two cuts of the log (one sort each): test out of
    the whole log, validation out of test's history, and the within-order round beside each."""

    validation: Round
    test: Round
    basket_validation: BasketRound
    basket_test: BasketRound


def all_rounds(
    events: pd.DataFrame, fraction: float = 0.2, relevant_min_weight: float | None = None
) -> Rounds:
    """`temporal_rounds` and the `basket_round` of each of its cuts, each log cut once."""
    test_cut = _cut(events, fraction)
    test = _time_round(test_cut, "test", relevant_min_weight)
    validation_cut = _cut(test.history, fraction)
    return Rounds(
        _time_round(validation_cut, "validation", relevant_min_weight),
        test,
        _basket_round(validation_cut, "basket-validation", relevant_min_weight),
        _basket_round(test_cut, "basket-test", relevant_min_weight),
    )
