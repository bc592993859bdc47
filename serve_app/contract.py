"""Model-input contract: pure functions that training and serving must compute identically.

Feature hashing, title tokens and the ranker's feature matrix are part of the bundle format: a model trained
on one definition and served with another is silent train/serve skew. Both sides import them from here (the
only serve_app module besides `schemas` that `training` may import); numpy and scipy.sparse only, no I/O.

Collaborative signals (`Collaborative`) are optional in a bundle: a ranker trained on
`RANKER_FEATURE_NAMES + CF_FEATURE_NAMES` needs them, one trained on `RANKER_FEATURE_NAMES` does not.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

TOKEN_PATTERN = re.compile(r"[a-z0-9]+")

# Columns of the bundle's item_features.npy, in order.
ITEM_FEATURE_NAMES = ("log_pop_all", "log_pop_7d", "log_pop_1d", "ctr", "age_days", "log_price")
# Columns of the ranker's input matrix, in order (the manifest's `ranker_features`).
RANKER_FEATURE_NAMES = (
    "retrieval_score",
    "retrieval_rank",
    *(f"item_{n}" for n in ITEM_FEATURE_NAMES),
    "user_category_affinity",
    "user_recent_category_share",
    "user_log_activity",
    "user_recent_count",
)


# Collaborative signals, each an item-item matrix applied to part of the user's history:
# ease = EASE weights on every seen item; ease_last = EASE on the last `last_items` items;
# next = "bought within a few steps after" transitions from the last items; knn = item-kNN
# cosine on every seen item; basket = "in the same order" cosine (item-kNN over sessions) on the
# newest `basket_items` items: what completes the order in progress.
CF_SIGNALS = ("ease", "ease_last", "next", "knn", "basket")
CF_PARTS = ("score", "share", "rank")
# Per signal: its score, the score over the user's best unseen score, and its rank among the
# candidates (0 = best).
CF_FEATURE_NAMES = tuple(f"{s}_{part}" for s in CF_SIGNALS for part in CF_PARTS)
RANKER_FEATURE_NAMES_CF = (*RANKER_FEATURE_NAMES, *CF_FEATURE_NAMES)
# Bundles from before the basket signal: their rankers read the first four signals' columns.
LEGACY_CF_FEATURE_NAMES = CF_FEATURE_NAMES[: 4 * len(CF_PARTS)]
RANKER_FEATURE_NAMES_CF_LEGACY = (*RANKER_FEATURE_NAMES, *LEGACY_CF_FEATURE_NAMES)
# The ranker feature lists a server understands.
RANKER_FEATURE_SETS = (
    RANKER_FEATURE_NAMES,
    RANKER_FEATURE_NAMES_CF,
    RANKER_FEATURE_NAMES_CF_LEGACY,
)


def hash_bucket(value: str, buckets: int) -> int:
    """Stable hash of an id or token into [0, buckets): identical in every process and release."""
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


# The bundle's list of the users its training data held (optional file; without it every user is
# known): sorted unique `user_key`s, uint64. The event writer gives the real-time state of anyone
# else (a cold user) a shorter expiry.
KNOWN_USERS_FILE = "known_users.npy"


def user_key(user_id: str) -> int:
    """A user id's 64-bit key (blake2b-64, little-endian): what `KNOWN_USERS_FILE` holds."""
    return int.from_bytes(
        hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest(), "little"
    )


def known_user_keys(user_ids: Iterable[str]) -> np.ndarray:
    """Sorted unique `user_key`s of `user_ids` (uint64): the `KNOWN_USERS_FILE` array."""
    keys = np.fromiter((user_key(u) for u in set(user_ids)), dtype=np.uint64)
    return np.unique(keys)


def is_known_user(known: np.ndarray, user_id: str) -> bool:
    """Whether `user_id`'s key is in a sorted `known_user_keys` array (a 64-bit collision, ~n/2^64,
    only gives an unknown user the longer expiry)."""
    key = np.uint64(user_key(user_id))
    at = int(np.searchsorted(known, key))
    return at < len(known) and known[at] == key


def title_tokens(title: str) -> list[str]:
    """Lower-case alphanumeric tokens of a title, as the item tower sees them."""
    return TOKEN_PATTERN.findall(title.lower())


def ranker_features(
    candidates: np.ndarray,
    retrieval_scores: np.ndarray,
    item_features: np.ndarray,
    item_categories: np.ndarray,
    category_prefs: np.ndarray,
    event_count: np.ndarray,
    recent_items: np.ndarray,
) -> np.ndarray:
    """The ranker's input matrix, one row per (user, candidate), users major.

    candidates: int [B, N] item indices (-1 = padding, rows of zeros are produced for it);
    retrieval_scores: float [B, N]; item_features: float [n_items, len(ITEM_FEATURE_NAMES)];
    item_categories: int [n_items]; category_prefs: float [B, C]; event_count: float [B];
    recent_items: int [B, L] item index + 1, 0 = padding.
    Returns float32 [B * N, len(RANKER_FEATURE_NAMES)].
    """
    b, n = candidates.shape
    safe = np.where(candidates >= 0, candidates, 0)
    cats = item_categories[safe]  # [B, N]
    rank = np.broadcast_to(np.arange(n, dtype=np.float32), (b, n))
    affinity = np.take_along_axis(category_prefs, cats, axis=1)
    recent_mask = recent_items > 0
    recent_cats = np.where(recent_mask, item_categories[np.maximum(recent_items - 1, 0)], -1)
    recent_count = recent_mask.sum(axis=1).astype(np.float32)
    same = (recent_cats[:, None, :] == cats[:, :, None]).sum(axis=2)
    recent_share = same / np.maximum(recent_count, 1.0)[:, None]
    per_user = np.stack(
        [
            np.broadcast_to(np.log1p(event_count)[:, None], (b, n)),
            np.broadcast_to(recent_count[:, None], (b, n)),
        ],
        axis=2,
    )
    x = np.concatenate(
        [
            retrieval_scores[:, :, None],
            rank[:, :, None],
            item_features[safe],
            affinity[:, :, None],
            recent_share[:, :, None],
            per_user,
        ],
        axis=2,
    ).astype(np.float32)
    x[candidates < 0] = 0.0
    return x.reshape(b * n, len(RANKER_FEATURE_NAMES))


# --- collaborative signals -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Collaborative:
    """The bundle's item-item matrices ([n_items, n_items] CSR, float32) and how to apply them."""

    ease: sp.csr_matrix
    knn: sp.csr_matrix
    transitions: sp.csr_matrix
    last_items: int  # newest history items read by ease_last and next
    per_source: int  # candidates each signal adds (its top unseen items with a positive score)
    # None (a bundle from before the signal): an empty matrix, made once here, never per request.
    basket: sp.csr_matrix | None = None
    basket_items: int = 10  # newest history items read by basket

    def __post_init__(self) -> None:
        if self.basket is None:
            object.__setattr__(self, "basket", sp.csr_matrix(self.knn.shape, dtype=np.float32))

    def matrix(self, signal: str) -> sp.csr_matrix:
        by_signal = {
            "ease": self.ease,
            "ease_last": self.ease,
            "next": self.transitions,
            "basket": self.basket,
        }
        chosen = by_signal.get(signal)
        return self.knn if chosen is None else chosen


def row_sum(matrix: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """Sum of some rows of a CSR matrix, dense float32 [n_cols] (`sparse_row_sum` spread out)."""
    at, values = sparse_row_sum(matrix, rows)
    out = np.zeros(matrix.shape[1], dtype=np.float32)
    out[at] = values
    return out


def sparse_row_sum(matrix: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum of some rows of a CSR matrix as (columns ascending, float32 sums): every column any of the
    rows holds, a sum that cancels to 0 included. Accumulated in float64 in the order of `rows`
    (so training and serving, passing the same rows, get the same bits). Its cost grows with the
    rows' entries, not with the catalog: at a million items a user's scores are a few thousand."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = matrix.indptr[rows]
    lengths = matrix.indptr[rows + 1] - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    first = np.cumsum(lengths) - lengths  # where each row's entries start in the gathered list
    at = np.repeat(starts - first, lengths) + np.arange(total)
    columns, slot = np.unique(matrix.indices[at], return_inverse=True)
    summed = np.bincount(slot, weights=matrix.data[at], minlength=len(columns))
    return columns.astype(np.int64), summed.astype(np.float32)


@dataclass(frozen=True)
class SignalScores:
    """One user's collaborative scores, sparse: per signal of `CF_SIGNALS`, the items it scores
    (rows ascending) and their float32 scores; every other item scores 0."""

    rows: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]

    def at(self, signal: int, items: np.ndarray) -> np.ndarray:
        """Scores of `items` (int rows, any order) under one signal: float32, 0 where unscored."""
        rows, values = self.rows[signal], self.values[signal]
        pos = np.minimum(np.searchsorted(rows, items), max(len(rows) - 1, 0))
        hit = (rows[pos] == items) if len(rows) else np.zeros(len(items), dtype=bool)
        return np.where(hit, values[pos] if len(rows) else 0.0, 0.0).astype(np.float32)

    def dense(self, n_items: int) -> np.ndarray:
        """float32 [len(CF_SIGNALS), n_items] (tests and small catalogs)."""
        out = np.zeros((len(self.rows), n_items), dtype=np.float32)
        for signal, (rows, values) in enumerate(zip(self.rows, self.values, strict=True)):
            out[signal, rows] = values
        return out


def cf_scores(model: Collaborative, seen: np.ndarray, recent: np.ndarray) -> SignalScores:
    """Every signal's scores for one user, sparse (`SignalScores`).

    seen: item rows the user interacted with (any order, repeats allowed); recent: int [L] item
    row + 1, newest first, 0 = padding (the newest `last_items` feed ease_last and next).
    """
    everything = np.unique(np.asarray(seen, dtype=np.int64))
    newest = _newest(recent, model.last_items)
    basket = _newest(recent, model.basket_items)
    reads = {
        "ease": everything,
        "ease_last": newest,
        "next": newest,
        "knn": everything,
        "basket": basket,
    }
    sums = [sparse_row_sum(model.matrix(s), reads[s]) for s in CF_SIGNALS]
    return SignalScores(tuple(r for r, _ in sums), tuple(v for _, v in sums))


def _newest(recent: np.ndarray, n: int) -> np.ndarray:
    """Item rows of the newest `n` entries of a recent-items list (item row + 1, 0 = padding)."""
    newest = np.asarray(recent[:n], dtype=np.int64)
    return newest[newest > 0] - 1


def cf_candidates(
    scores: SignalScores, excluded: np.ndarray, taken: np.ndarray, per_source: int
) -> np.ndarray:
    """One user's collaborative candidates: each signal's top `per_source` items with a positive
    score, none `excluded` or already `taken`, in signal order then score order (ties: lower row;
    at the cut itself, whichever `argpartition` keeps: deterministic, the same on both sides).

    excluded, taken: item rows (`excluded` may hold most of the catalog under a narrow filter:
    it is searched, never merged). Returns unique int64 rows.
    """
    excluded = _sorted(np.asarray(excluded, dtype=np.int64))
    blocked = np.unique(np.asarray(taken, dtype=np.int64))
    out: list[np.ndarray] = []
    for rows, signal in zip(scores.rows, scores.values, strict=True):
        keep = (signal > 0) & ~_holds(excluded, rows) & ~_holds(blocked, rows)
        open_, values = rows[keep], signal[keep]
        if len(open_) > per_source:
            cut = np.argpartition(-values, per_source - 1)[:per_source]
            open_, values = open_[cut], values[cut]
        top = open_[np.lexsort((open_, -values))]
        blocked = np.union1d(blocked, top)
        out.append(top)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def _sorted(rows: np.ndarray) -> np.ndarray:
    return rows if len(rows) < 2 or bool((rows[1:] >= rows[:-1]).all()) else np.sort(rows)


def _holds(sorted_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """bool [len(rows)]: which of `rows` are in `sorted_rows` (ascending, repeats allowed)."""
    if len(sorted_rows) == 0:
        return np.zeros(len(rows), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_rows, rows), len(sorted_rows) - 1)
    return sorted_rows[pos] == rows


def cf_features(scores: SignalScores, candidates: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """One user's collaborative ranker columns [N, len(CF_FEATURE_NAMES)] (float32, 0 on padding).

    candidates: int [N] rows, -1 = padding; seen: the user's item rows (the share's denominator is
    the best score among unseen items, 0 when none is positive).
    """
    n = len(candidates)
    valid = candidates >= 0
    safe = np.where(valid, candidates, 0)
    seen = _sorted(np.asarray(seen, dtype=np.int64))
    columns = []
    for signal, (rows, values) in enumerate(zip(scores.rows, scores.values, strict=True)):
        at = scores.at(signal, safe)
        best = values[~_holds(seen, rows)].max(initial=0.0)
        order = np.argsort(np.where(valid, -at, np.inf), kind="stable")
        rank = np.empty(n, dtype=np.float32)
        rank[order] = np.arange(n, dtype=np.float32)
        share = np.clip(at / np.maximum(best, np.float32(1e-9)), -1.0, 1.0)
        columns += [at, share, rank]
    x = np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((n, 0), np.float32)
    x[~valid] = 0.0
    return x
