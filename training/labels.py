"""Ranker labels inside the log a bundle is fit on: which users, which items, and their state before.

Two schemes (`split.ranker_labels`): `window`, the positives after a time quantile with every state as
of that moment; `tail`, each user's newest first positives with the state just before them (a request in
the middle of a visit, the usual case in a basket log). Both return the events the labels must not be
learned from, so the towers and collaborative models behind the ranker's features are fit without them.
With `max_users`, the groups are a seeded sample of that many labelled users (states are computed for
those only), while the returned mask still removes every user's label events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from training.features import EncodedLog, UserStates, first_positives, user_states_at

GRADES = {"click": 1.0, "add_to_cart": 2.0, "purchase": 3.0}


@dataclass(frozen=True)
class Window:
    """Users with new positive items in a time window, their states at its start, and the grades."""

    states: UserStates
    grades: sp.csr_matrix  # [B, n_items]: best grade of each new positive item in the window


def sample_codes(codes: np.ndarray, max_users: int | None, seed: int) -> np.ndarray:
    """A seeded sample of `max_users` of the sorted user `codes` (all of them when not more)."""
    if max_users is None or len(codes) <= max_users:
        return codes
    return np.sort(np.random.default_rng(seed).choice(codes, size=max_users, replace=False))


def label_window(
    log_: EncodedLog,
    start: pd.Timestamp,
    end: pd.Timestamp | None,
    history_length: int,
    event_types: np.ndarray,
    max_users: int | None = None,
    seed: int = 0,
) -> Window:
    """States as of `start` for users with positives in [start, end) on items they had not seen
    (a sample of `max_users` of them when there are more)."""
    in_window = (log_.ts >= start.value) & log_.positive
    if end is not None:
        in_window &= log_.ts < end.value
    idx = np.flatnonzero(in_window)
    users = sample_codes(np.unique(log_.user[idx]), max_users, seed)
    if len(users) < len(np.unique(log_.user[idx])):
        idx = idx[np.isin(log_.user[idx], users)]
    states = user_states_at(log_, log_.user_ids[users], start, history_length)
    return _graded_window(log_, idx, users, states, event_types)


def _graded_window(
    log_: EncodedLog,
    idx: np.ndarray,
    users: np.ndarray,
    states: UserStates,
    event_types: np.ndarray,
) -> Window:
    """The window of label events `idx` for `users` (codes, the rows of `states`): each user's best
    grade per item, items already seen dropped, users left without a label dropped."""
    row = np.full(len(log_.user_ids), -1)
    row[users] = np.arange(len(users))
    grade = np.array([GRADES.get(t, 0.0) for t in event_types[idx]], dtype=np.float32)
    grades = _max_per_cell(
        sp.coo_matrix(
            (grade, (row[log_.user[idx]], log_.item[idx])), shape=(len(users), log_.n_items)
        )
    )
    grades = grades - grades.multiply(states.seen)  # new items only
    grades.eliminate_zeros()
    keep = np.diff(grades.indptr) > 0
    kept_states = UserStates(
        states.user_ids[keep],
        states.event_count[keep],
        states.category_prefs[keep],
        states.recent_items[keep],
        states.seen[keep],
    )
    return Window(kept_states, grades[keep])


def tail_window(
    log_: EncodedLog,
    end: pd.Timestamp,
    fraction: float,
    history_length: int,
    event_types: np.ndarray,
    max_users: int | None = None,
    seed: int = 0,
) -> tuple[Window, EncodedLog]:
    window, mask = tail_labels(log_, end, fraction, history_length, event_types, max_users, seed)
    return window, log_.subset(mask)


def tail_labels(
    log_: EncodedLog,
    end: pd.Timestamp,
    fraction: float,
    history_length: int,
    event_types: np.ndarray,
    max_users: int | None = None,
    seed: int = 0,
) -> tuple[Window, np.ndarray]:
    """Labels at each user's own moment: the newest `fraction` (ceil, at least 1) of their first
    positive items before `end`, for users with at least 2 of them; states from everything they did
    before the first of those. Returns the window and the log without any label event or what
    followed it (for item statistics and collaborative models fit without the labels); `tail_labels`
    returns that as a mask over the log's events instead.
    """
    before = log_.before(end)
    first = first_positives(log_, before)
    users = log_.user[first]
    order = np.argsort(users, kind="stable")  # per user, time order kept
    first, users = first[order], users[order]
    size = np.bincount(users, minlength=len(log_.user_ids))
    start = np.searchsorted(users, users, side="left")
    from_end = size[users] - 1 - (np.arange(len(users)) - start)
    n_label = np.maximum(np.ceil(fraction * size - 1e-9), 1).astype(np.int64)
    is_label = (from_end < n_label[users]) & (size[users] >= 2)
    # The first label event's position in the log, per user (the log is in time order).
    label_start = np.full(len(log_.user_ids), len(log_.ts), dtype=np.int64)
    np.minimum.at(label_start, users[is_label], first[is_label])
    position = np.arange(len(log_.ts))
    history = before & (position < label_start[log_.user])
    labelled = sample_codes(np.flatnonzero(label_start < len(log_.ts)), max_users, seed)
    idx = np.flatnonzero(before & ~history & log_.positive)
    if len(labelled) < int((label_start < len(log_.ts)).sum()):
        idx = idx[np.isin(log_.user[idx], labelled)]
    kept = log_.subset(history)
    states = user_states_at(kept, log_.user_ids[labelled], None, history_length)
    return _graded_window(log_, idx, labelled, states, event_types), history


def _max_per_cell(m: sp.coo_matrix) -> sp.csr_matrix:
    order = np.lexsort((-m.data, m.col, m.row))
    r, c, d = m.row[order], m.col[order], m.data[order]
    first = np.ones(len(r), dtype=bool)
    first[1:] = (r[1:] != r[:-1]) | (c[1:] != c[:-1])
    return sp.csr_matrix((d[first], (r[first], c[first])), shape=m.shape)


def relevant_lists(grades: sp.csr_matrix) -> list[np.ndarray]:
    return [grades.indices[grades.indptr[i] : grades.indptr[i + 1]] for i in range(grades.shape[0])]
