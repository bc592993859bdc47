"""Offline feature computation, point-in-time: user states and item statistics as of a cutoff.

These are the offline twins of the Feast views (`user_profile`, `user_realtime`, `item_profile`): the same
definitions feed training rows, evaluation and the Parquet sources that Feast materializes, so what a model
sees offline is what serving reads online. Only positive interactions (click and stronger) build a user's
history: a view is an exposure chosen by the system, not a signal from the user.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp

from serve_app.schemas import POSITIVE_EVENT_TYPES

NS_PER_DAY = 86_400 * 10**9


@dataclass(frozen=True)
class EncodedLog:
    """An events frame as integer arrays against a fixed item vocabulary, sorted by time."""

    user_ids: np.ndarray  # distinct user ids (str), index = user code
    user: np.ndarray  # int64 user code per event
    item: np.ndarray  # int64 item index per event
    category: np.ndarray  # int64 category index per event
    ts: np.ndarray  # int64 ns since epoch
    weight: np.ndarray  # float32
    positive: np.ndarray  # bool: click, add_to_cart or purchase
    is_view: np.ndarray  # bool
    n_items: int
    n_categories: int
    # int64 session (order) code per event, -1 where the log has none; None: no sessions at all.
    session: np.ndarray | None = None

    def before(self, cutoff: pd.Timestamp) -> np.ndarray:
        return np.asarray(self.ts < cutoff.value)

    def subset(self, keep: np.ndarray) -> EncodedLog:
        """The events where `keep` is true (same vocabularies and user codes)."""
        return replace(
            self,
            user=self.user[keep],
            item=self.item[keep],
            category=self.category[keep],
            ts=self.ts[keep],
            weight=self.weight[keep],
            positive=self.positive[keep],
            is_view=self.is_view[keep],
            session=None if self.session is None else self.session[keep],
        )


def encode_log(
    events: pd.DataFrame, item_index: pd.Index, item_categories: np.ndarray, n_categories: int
) -> EncodedLog:
    """Encode events; events whose item is not in `item_index` are dropped (unknown to the catalog)."""
    item = item_index.get_indexer(pd.Index(events["item_id"]))
    keep = item >= 0
    ev = events.loc[keep]
    item = item[keep].astype(np.int64)
    user_codes, user_ids = pd.factorize(ev["user_id"], sort=True)
    session = None
    if "session_id" in ev.columns:
        named, _ = pd.factorize(ev["session_id"].fillna("").astype(str).replace("", None))
        if (named >= 0).any():
            # A session id is the user's own: two users' "1" are two sessions. Integer pairs, not
            # concatenated strings (10M events at xl, and every Log is encoded several times).
            valid = named >= 0
            pair = user_codes.astype(np.int64) * (int(named.max()) + 1) + named
            session = np.full(len(named), -1, dtype=np.int64)
            session[valid] = pd.factorize(pair[valid])[0]
    return EncodedLog(
        user_ids=np.asarray(user_ids, dtype=str),
        user=user_codes.astype(np.int64),
        item=item,
        category=item_categories[item].astype(np.int64),
        ts=pd.DatetimeIndex(ev["timestamp"]).asi8.astype(np.int64),
        weight=ev["weight"].to_numpy(np.float32),
        positive=ev["event_type"].isin(POSITIVE_EVENT_TYPES).to_numpy(),
        is_view=(ev["event_type"] == "view").to_numpy(),
        n_items=len(item_index),
        n_categories=n_categories,
        session=session,
    )


@dataclass(frozen=True)
class UserStates:
    """What the user tower and the ranker know about each user at one moment."""

    user_ids: np.ndarray  # str [B]
    event_count: np.ndarray  # float32 [B]: positive interactions so far
    category_prefs: np.ndarray  # float32 [B, C]: weight share per category
    recent_items: np.ndarray  # int64 [B, L]: item index + 1, most recent first, 0 = padding
    seen: sp.csr_matrix  # [B, n_items]: items the user already interacted with positively

    def profile(self) -> np.ndarray:
        """The user tower's dense profile input: [log1p(count), category shares]."""
        count = np.log1p(self.event_count)[:, None].astype(np.float32)
        return np.hstack([count, self.category_prefs]).astype(np.float32)


def first_positives(log: EncodedLog, mask: np.ndarray) -> np.ndarray:
    """Indices (time order) of each user's first positive event per item, within `mask`."""
    idx = np.flatnonzero(mask & log.positive)
    pairs = log.user[idx] * log.n_items + log.item[idx]
    _, first = np.unique(pairs, return_index=True)
    return np.sort(idx[first])


def user_states_at(
    log: EncodedLog, user_ids: np.ndarray, cutoff: pd.Timestamp | None, history_length: int
) -> UserStates:
    """User states from every event strictly before `cutoff` (None: the whole log).

    Users absent from the log get an empty state (the cold-start case).
    """
    mask = log.before(cutoff) if cutoff is not None else np.ones(len(log.ts), dtype=bool)
    first = first_positives(log, mask)
    pos = np.flatnonzero(mask & log.positive)
    codes = pd.Index(log.user_ids).get_indexer(user_ids)
    row_of_code = np.full(len(log.user_ids), -1, dtype=np.int64)
    known = codes >= 0
    row_of_code[codes[known]] = np.flatnonzero(known)
    n = len(user_ids)

    count = np.zeros(n, dtype=np.float32)
    prefs = np.zeros((n, log.n_categories), dtype=np.float32)
    rows = row_of_code[log.user[pos]]
    sel = rows >= 0
    np.add.at(count, rows[sel], 1.0)
    np.add.at(prefs, (rows[sel], log.category[pos][sel]), log.weight[pos][sel])
    prefs /= prefs.sum(axis=1, keepdims=True).clip(1e-12)

    recent = np.zeros((n, history_length), dtype=np.int64)
    frows = row_of_code[log.user[first]]
    fsel = frows >= 0
    f_rows, f_items = frows[fsel], log.item[first][fsel]
    # Walk each user's first positives newest first; keep the first `history_length`.
    order = np.lexsort((-np.arange(len(f_rows)), f_rows))
    f_rows, f_items = f_rows[order], f_items[order]
    starts = np.searchsorted(f_rows, f_rows, side="left")
    rank = np.arange(len(f_rows)) - starts
    keep = rank < history_length
    recent[f_rows[keep], rank[keep]] = f_items[keep] + 1

    seen = sp.csr_matrix(
        (np.ones(len(f_rows), dtype=np.float32), (f_rows, f_items)), shape=(n, log.n_items)
    )
    seen.data[:] = 1.0
    return UserStates(np.asarray(user_ids), count, prefs, recent, seen)


# Dense values per chunk of training rows: rows x categories stays under this many (32 MB float64).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class TrainingRows:
    """Point-in-time training rows for the two-tower: one per first positive (user, item).

    The category shares are sparse (a row holds the categories its user had touched before it), so
    the rows cost memory by what users did, never rows x categories; `profile(idx)` densifies the
    rows of one batch.
    """

    user_ids: np.ndarray  # str [N]
    item: np.ndarray  # int64 [N] target item index
    weight: np.ndarray  # float32 [N] event weight
    position: np.ndarray  # int32 [N], -1 when unknown
    count: np.ndarray  # float32 [N]: the user's positives before the event
    prefs: sp.csr_matrix  # float32 [N, C]: category weight shares before the event
    recent: np.ndarray  # int32 [N, L], as of just before the event

    def profile(self, idx: np.ndarray | None = None) -> np.ndarray:
        """The user tower's profile input of rows `idx` (None: all): float32 [len, 1 + C]."""
        count = self.count if idx is None else self.count[idx]
        prefs = self.prefs if idx is None else self.prefs[idx]
        out = np.empty((len(count), 1 + self.prefs.shape[1]), dtype=np.float32)
        out[:, 0] = np.log1p(count)
        out[:, 1:] = prefs.toarray()
        return out


def _chunk_bounds(user_sorted: np.ndarray, width: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges over events sorted by user, cut at user boundaries, each about
    `_CHUNK_ELEMENTS // width` events (a single user with more is one chunk of its own)."""
    n = len(user_sorted)
    target = max(1, _CHUNK_ELEMENTS // max(width, 1))
    bounds, lo = [], 0
    while lo < n:
        hi = min(n, lo + target)
        if hi < n:
            # Back up to the start of the user straddling hi; if that is lo, take that user whole.
            cut = int(np.searchsorted(user_sorted, user_sorted[hi], side="left"))
            hi = cut if cut > lo else int(np.searchsorted(user_sorted, user_sorted[hi], "right"))
        bounds.append((lo, hi))
        lo = hi
    return bounds


def training_rows(
    log: EncodedLog, position: np.ndarray, mask: np.ndarray, history_length: int
) -> TrainingRows:
    """Rows for every first positive (user, item) in `mask`, with the state just before it.

    Built in chunks of users: the dense category sums of one chunk are the only array that grows
    with categories (`_CHUNK_ELEMENTS`), and they are kept as sparse shares.
    """
    first = first_positives(log, mask)
    pos_idx = np.flatnonzero(mask & log.positive)
    n, n_cat = len(first), log.n_categories

    # Category weights accumulated per user over positives, read just before each target event.
    order = np.lexsort((pos_idx, log.user[pos_idx]))
    p_sorted = pos_idx[order]
    user_sorted = log.user[p_sorted]
    start = np.searchsorted(user_sorted, user_sorted, side="left")
    loc = np.empty(len(log.ts), dtype=np.int64)
    loc[p_sorted] = np.arange(len(p_sorted))
    g = loc[first]  # each row's target in the sorted positives
    count = (g - start[g]).astype(np.float32)
    by_g = np.argsort(g, kind="stable")
    g_sorted = g[by_g]
    blocks: list[sp.csr_matrix] = []
    for lo, hi in _chunk_bounds(user_sorted, n_cat):
        part = p_sorted[lo:hi]
        onehot = np.zeros((hi - lo, n_cat), dtype=np.float64)
        onehot[np.arange(hi - lo), log.category[part]] = log.weight[part]
        cum = np.cumsum(onehot, axis=0)
        del onehot
        a, b = np.searchsorted(g_sorted, [lo, hi], side="left")
        tg = g_sorted[a:b] - lo  # targets in this chunk (chunk-local)
        prev = tg - 1
        has_prev = prev >= start[g_sorted[a:b]] - lo
        user_start = start[g_sorted[a:b]] - lo
        base = np.where((user_start > 0)[:, None], cum[np.maximum(user_start - 1, 0)], 0.0)
        prefs = np.where(has_prev[:, None], cum[np.maximum(prev, 0)] - base, 0.0)
        prefs /= prefs.sum(axis=1, keepdims=True).clip(1e-12)
        blocks.append(sp.csr_matrix(prefs.astype(np.float32)))
    stacked = (
        sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n_cat), dtype=np.float32)
    )
    back = np.empty(n, dtype=np.int64)
    back[by_g] = np.arange(n)
    prefs_rows = sp.csr_matrix(stacked[back], dtype=np.float32)

    # Recent items: the user's previous first positives, most recent first (in row blocks).
    f_order = np.lexsort((first, log.user[first]))
    f_sorted = first[f_order]
    f_user = log.user[f_sorted]
    f_start = np.searchsorted(f_user, f_user, side="left")
    f_item = log.item[f_sorted]
    offsets = np.arange(1, history_length + 1)
    recent = np.empty((n, history_length), dtype=np.int32)
    step = max(1, _CHUNK_ELEMENTS // history_length)
    for lo in range(0, n, step):
        hist_pos = np.arange(lo, min(n, lo + step))[:, None] - offsets[None, :]
        valid = hist_pos >= f_start[lo : lo + step, None]
        recent[f_order[lo : lo + step]] = np.where(valid, f_item[np.maximum(hist_pos, 0)] + 1, 0)

    return TrainingRows(
        user_ids=log.user_ids[log.user[first]],
        item=log.item[first],
        weight=log.weight[first],
        position=position[first].astype(np.int32),
        count=count,
        prefs=prefs_rows,
        recent=recent,
    )


@dataclass(frozen=True)
class ItemStats:
    """Item statistics as of a cutoff: popularity windows, click-through rate, age."""

    pop_all: np.ndarray  # float32 [n_items]: positive weight, all history
    pop_7d: np.ndarray
    pop_1d: np.ndarray
    ctr: np.ndarray  # smoothed clicks / views
    age_days: np.ndarray

    def matrix(self, price: np.ndarray) -> np.ndarray:
        """The bundle's `item_features.npy`: columns in `contract.ITEM_FEATURE_NAMES` order."""
        return np.column_stack(
            [
                np.log1p(self.pop_all),
                np.log1p(self.pop_7d),
                np.log1p(self.pop_1d),
                self.ctr,
                self.age_days,
                np.log1p(price),
            ]
        ).astype(np.float32)


def item_stats_at(log: EncodedLog, cutoff: pd.Timestamp, created_at_ns: np.ndarray) -> ItemStats:
    """Item statistics from events strictly before `cutoff`."""
    before = log.before(cutoff)
    pos = before & log.positive
    n = log.n_items

    def window(days: float | None) -> np.ndarray:
        m = pos if days is None else pos & (log.ts >= cutoff.value - int(days * NS_PER_DAY))
        return np.bincount(log.item[m], weights=log.weight[m], minlength=n).astype(np.float32)

    clicks = np.bincount(log.item[pos], minlength=n).astype(np.float32)
    views = np.bincount(log.item[before & log.is_view], minlength=n).astype(np.float32)
    prior = clicks.sum() / max(views.sum(), 1.0)
    ctr = (clicks + 10 * prior) / (views + 10)
    age = ((cutoff.value - created_at_ns) / NS_PER_DAY).astype(np.float32)
    return ItemStats(window(None), window(7), window(1), ctr.astype(np.float32), age)
