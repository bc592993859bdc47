"""Baseline recommenders the two-tower model must beat: popularity, recency, item-kNN, EASE.

All share one small interface (`fit` on a user x item weight matrix, `score`, `recommend`) and rank
with `evaluate.top_k_from_scores`, so their numbers in `pipeline.py` and `bench/` are comparable.
Users without history get the popularity ranking from kNN and EASE (see `_rank_with_fallback`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol, TypeAlias

import numpy as np
import pandas as pd
import scipy.sparse as sp

from training.evaluate import (
    Relevance,
    ndcg_at_k,
    relevance_hits,
    relevance_matrix,
    top_k_from_scores,
)

SparseLike: TypeAlias = sp.spmatrix | sp.sparray

# Elements per dense similarity block in ItemKNN.fit: ~32 MB of float64 at a time.
_KNN_BLOCK_ELEMENTS = 1 << 22
# Co-occurrence entries per chunk of the sparse item-kNN (~40 bytes each while scored and topped).
_KNN_CHUNK_PAIRS = 1 << 24


class CatalogTooLargeError(ValueError):
    """A dense per-item model was asked to fit more items than its configured cap."""


class Recommender(Protocol):
    """What every baseline offers; `recommend` returns [len(users), k] item indices, -1 padded."""

    def fit(self, interactions: SparseLike) -> Recommender: ...

    def score(self, user_indices: np.ndarray) -> np.ndarray: ...

    def recommend(
        self, user_indices: np.ndarray, k: int, exclude: SparseLike | None = None
    ) -> np.ndarray: ...


def as_interactions(interactions: SparseLike) -> sp.csr_matrix:
    """Canonical float64 CSR of non-negative weights: duplicates summed, explicit zeros dropped."""
    matrix = sp.csr_matrix(interactions, dtype=np.float64, copy=True)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    matrix.sort_indices()
    if matrix.nnz and matrix.data.min() < 0:
        raise ValueError("interaction weights must be >= 0 (negative feedback is not a weight)")
    return matrix


def _user_indices(user_indices: np.ndarray | Sequence[int], n_users: int | None) -> np.ndarray:
    users = np.asarray(user_indices, dtype=np.int64).ravel()
    if users.size and users.min() < 0:
        raise ValueError("user indices must be >= 0")
    if n_users is not None and users.size and users.max() >= n_users:
        raise ValueError(f"user index {int(users.max())} out of range for {n_users} fitted users")
    return users


def _exclude_rows(
    exclude: SparseLike | None, users: np.ndarray, n_items: int
) -> sp.csr_matrix | None:
    """Rows of `exclude` (indexed by user index, like the training matrix) for these users."""
    if exclude is None:
        return None
    matrix = sp.csr_matrix(exclude)
    if matrix.shape[1] != n_items:
        raise ValueError(f"exclude has {matrix.shape[1]} columns, expected {n_items} items")
    if users.size and users.max() >= matrix.shape[0]:
        raise ValueError(f"exclude has no row for user {int(users.max())}")
    return sp.csr_matrix(matrix[users])


def _first_k_not_excluded(
    order: np.ndarray, k: int, exclude: sp.csr_matrix | None, n_rows: int
) -> np.ndarray:
    """The first k items of one global `order` per row, skipping that row's excluded items.

    A row can lose at most its own count of exclusions, so only the first k + max(row nnz)
    entries of `order` are ever looked at: O(n (k + nnz)) instead of a full per-row top-k.
    """
    if exclude is None or exclude.nnz == 0:
        head = np.full(k, -1, dtype=np.int64)
        head[: min(k, order.size)] = order[:k]
        return np.repeat(head[None, :], n_rows, axis=0)
    depth = min(order.size, k + int(np.diff(exclude.indptr).max()))
    candidates = np.broadcast_to(order[:depth], (n_rows, depth))
    keep = ~relevance_hits(candidates, exclude)[0]
    slot = np.cumsum(keep, axis=1) - 1
    chosen = keep & (slot < k)
    out = np.full((n_rows, k), -1, dtype=np.int64)
    rows, cols = np.nonzero(chosen)
    out[rows, slot[rows, cols]] = candidates[rows, cols]
    return out


def _rank_with_fallback(
    scores: np.ndarray, popularity: np.ndarray, k: int, exclude: sp.csr_matrix | None
) -> np.ndarray:
    """Top-k by `scores`, each list's remaining slots filled by popularity.

    -inf in `scores[u, i]` means the model has nothing to say about item i for user u (no history,
    for EASE; no neighbour score, for kNN): such items come after every scored one, in popularity
    order. A user with no scored item gets the plain popularity ranking; excluded items never
    appear in either part.
    """
    primary = top_k_from_scores(scores, k, exclude)
    n_found = (primary >= 0).sum(axis=1)
    short = np.flatnonzero(n_found < k)
    if short.size == 0:
        return primary
    fill_scores = np.where(np.isneginf(scores[short]), popularity[None, :], -np.inf)
    fill = top_k_from_scores(fill_scores, k, exclude[short] if exclude is not None else None)
    # Slot j of a short row takes fill item j - n_found (fill never repeats a primary item: the
    # primary items had scores, and fill only ranks items without).
    slots = np.arange(k)[None, :] - n_found[short][:, None]
    from_fill = np.take_along_axis(fill, np.clip(slots, 0, k - 1), axis=1)
    primary[short] = np.where(slots >= 0, from_fill, primary[short])
    return primary


class PopularityRecommender:
    """Everyone gets the same list: items by total interaction weight (or distinct users)."""

    def __init__(self, use_weights: bool = True) -> None:
        self.use_weights = use_weights
        self.popularity_: np.ndarray | None = None

    def fit(self, interactions: SparseLike) -> PopularityRecommender:
        matrix = as_interactions(interactions)
        if self.use_weights:
            self.popularity_ = np.asarray(matrix.sum(axis=0), dtype=np.float64).ravel()
        else:
            self.popularity_ = np.bincount(matrix.indices, minlength=matrix.shape[1]).astype(
                np.float64
            )
        return self

    def _fitted(self) -> np.ndarray:
        if self.popularity_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit first")
        return self.popularity_

    def score(self, user_indices: np.ndarray) -> np.ndarray:
        popularity = self._fitted()
        users = _user_indices(user_indices, None)
        return np.broadcast_to(popularity, (users.size, popularity.size)).copy()

    def recommend(
        self, user_indices: np.ndarray, k: int, exclude: SparseLike | None = None
    ) -> np.ndarray:
        popularity = self._fitted()
        users = _user_indices(user_indices, None)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        # One global order (ties by lower index, as top_k_from_scores breaks them) for everyone.
        order = top_k_from_scores(popularity[None, :], popularity.size)[0]
        rows = _exclude_rows(exclude, users, popularity.size)
        return _first_k_not_excluded(order, k, rows, users.size)


class RecentPopularityRecommender(PopularityRecommender):
    """Popularity over a recent window, each event's weight halved every `half_life`.

    Events after `now` are ignored (no peeking past the training cutoff); `now` defaults to the
    last event's time. With neither window nor half-life this is plain popularity.
    """

    def __init__(
        self,
        window: pd.Timedelta | str | None = "7D",
        half_life: pd.Timedelta | str | None = "1D",
    ) -> None:
        super().__init__(use_weights=True)
        self.window = pd.Timedelta(window) if window is not None else None
        self.half_life = pd.Timedelta(half_life) if half_life is not None else None
        if self.window is not None and self.window <= pd.Timedelta(0):
            raise ValueError("window must be positive")
        if self.half_life is not None and self.half_life <= pd.Timedelta(0):
            raise ValueError("half_life must be positive")

    def fit(  # type: ignore[override]
        self,
        interactions: SparseLike,
        *,
        item_idx: np.ndarray,
        timestamps: np.ndarray | pd.Series,
        weights: np.ndarray | None = None,
        now: pd.Timestamp | None = None,
    ) -> RecentPopularityRecommender:
        """Fit from the event log; `interactions` only fixes the catalog size (its columns)."""
        return self.fit_events(item_idx, timestamps, weights, now, n_items=interactions.shape[1])

    def fit_events(
        self,
        item_idx: np.ndarray,
        timestamps: np.ndarray | pd.Series,
        weights: np.ndarray | None = None,
        now: pd.Timestamp | None = None,
        *,
        n_items: int,
    ) -> RecentPopularityRecommender:
        """Decayed, windowed weight per item from one row per event (item index, time, weight)."""
        items = np.asarray(item_idx, dtype=np.int64)
        times = pd.to_datetime(pd.Series(np.asarray(timestamps)), utc=True)
        if items.shape != (len(times),):
            raise ValueError("item_idx and timestamps must be 1-D and of equal length")
        if items.size and (items.min() < 0 or items.max() >= n_items):
            raise ValueError(f"item indices must be in [0, {n_items})")
        w = np.ones(items.size) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != items.shape or (w.size and w.min() < 0):
            raise ValueError("weights must be non-negative, one per event")
        if now is None:
            cutoff = times.max() if len(times) else pd.Timestamp(0, tz="UTC")
        else:
            cutoff = pd.Timestamp(now)
            cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff
        age = (cutoff - times).dt.total_seconds().to_numpy()
        keep = age >= 0
        if self.window is not None:
            keep &= age <= self.window.total_seconds()
        decay = np.ones(items.size)
        if self.half_life is not None:
            decay = np.exp2(-np.clip(age, 0.0, None) / self.half_life.total_seconds())
        self.popularity_ = np.bincount(items[keep], weights=(w * decay)[keep], minlength=n_items)
        return self


class ItemKNNRecommender:
    """Item-based kNN: shrunk cosine between item columns, the top `k_neighbors` kept per item.

    score(u, i) = sum over u's items j of weight(u, j) * sim(j, i), where only i's `k_neighbors`
    most similar items j count. Items without any neighbour score are filled by popularity.
    """

    def __init__(
        self, k_neighbors: int = 100, shrink: float = 10.0, dense_max_items: int = 20_000
    ) -> None:
        if k_neighbors < 1:
            raise ValueError("k_neighbors must be >= 1")
        if shrink < 0:
            raise ValueError("shrink must be >= 0")
        self.k_neighbors = k_neighbors
        # Up to this many items the similarities are scored in dense blocks (O(n^2) time, the
        # numbers small catalogs have always had); above, sparse co-occurrence (O(pairs)).
        self.dense_max_items = dense_max_items
        self.shrink = shrink
        self.similarity_: sp.csr_matrix | None = None
        self.interactions_: sp.csr_matrix | None = None
        self.popularity_: np.ndarray | None = None

    def fit(self, interactions: SparseLike) -> ItemKNNRecommender:
        matrix = as_interactions(interactions)
        if matrix.shape[1] > self.dense_max_items:
            self.similarity_ = sparse_knn_similarity(matrix, self.k_neighbors, self.shrink)
        else:
            self.similarity_ = self._dense_similarity(matrix)
        self.interactions_ = matrix
        self.popularity_ = np.asarray(matrix.sum(axis=0)).ravel()
        return self

    def _dense_similarity(self, matrix: sp.csr_matrix) -> sp.csr_matrix:
        n_items = matrix.shape[1]
        by_item = sp.csc_matrix(matrix)
        norms = np.sqrt(np.asarray(by_item.multiply(by_item).sum(axis=0)).ravel())
        keep = min(self.k_neighbors, max(n_items - 1, 0))
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        block = max(1, _KNN_BLOCK_ELEMENTS // max(n_items, 1))
        for start in range(0, n_items, block):
            stop = min(start + block, n_items)
            # Similarities of every item to the targets start..stop, as dense columns.
            gram = np.asarray((by_item.T @ by_item[:, start:stop]).todense())
            sims = gram / (norms[:, None] * norms[None, start:stop] + self.shrink + 1e-12)
            # An item is not its own neighbour.
            sims[np.arange(start, stop), np.arange(stop - start)] = 0.0
            if keep == 0:
                continue
            top = np.argpartition(-sims, keep - 1, axis=0)[:keep]
            top_vals = np.take_along_axis(sims, top, axis=0)
            positive = top_vals > 0
            rows.append(top[positive])
            cols.append(np.broadcast_to(np.arange(start, stop), top.shape)[positive])
            vals.append(top_vals[positive])
        if rows:
            data = (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols)))
            return sp.csr_matrix(data, shape=(n_items, n_items))
        return sp.csr_matrix((n_items, n_items))

    def _fitted(self) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
        if self.similarity_ is None or self.interactions_ is None or self.popularity_ is None:
            raise RuntimeError("ItemKNNRecommender is not fitted: call fit first")
        return self.similarity_, self.interactions_, self.popularity_

    def score_history(self, history: SparseLike) -> np.ndarray:
        """Scores [n, n_items] for arbitrary histories (rows over the fitted items)."""
        similarity, _, _ = self._fitted()
        return np.asarray((as_interactions(history) @ similarity).todense())

    def score(self, user_indices: np.ndarray) -> np.ndarray:
        _, interactions, _ = self._fitted()
        users = _user_indices(user_indices, interactions.shape[0])
        return self.score_history(interactions[users])

    def recommend(
        self, user_indices: np.ndarray, k: int, exclude: SparseLike | None = None
    ) -> np.ndarray:
        _, interactions, popularity = self._fitted()
        users = _user_indices(user_indices, interactions.shape[0])
        scores = self.score(users)
        scores[scores <= 0] = -np.inf  # no neighbour evidence: rank by popularity after the rest
        rows = _exclude_rows(exclude, users, popularity.size)
        return _rank_with_fallback(scores, popularity, k, rows)


def top_k_per_row_sparse(m: sp.csr_matrix, k: int) -> sp.coo_matrix:
    """The `k` largest positive entries of each row of `m` (ties: lower column first), as COO."""
    m.sum_duplicates()
    counts = np.diff(m.indptr)
    row = np.repeat(np.arange(m.shape[0]), counts)
    order = np.lexsort((m.indices, -m.data, row))  # by row, then value descending
    rank = np.arange(m.nnz) - np.repeat(m.indptr[:-1], counts)
    keep = order[(rank < k) & (m.data[order] > 0)]
    return sp.coo_matrix((m.data[keep], (row[keep], m.indices[keep])), shape=m.shape)


def sparse_knn_similarity(
    matrix: sp.csr_matrix, k_neighbors: int, shrink: float, chunk_pairs: int = _KNN_CHUNK_PAIRS
) -> sp.csr_matrix:
    """Item-kNN similarities from sparse co-occurrence: S[j, i] = shrunk cosine of items j and i,
    only i's `k_neighbors` largest kept (the layout `ItemKNNRecommender` scores with).

    Targets are taken in chunks whose co-occurrence pairs (bounded by the sum over a target's users
    of their history lengths) stay under `chunk_pairs`, so memory is O(nnz of the interactions +
    one chunk + the kept neighbours) at any catalog size; only pairs that co-occur are scored
    (an item pair nobody shares has cosine 0 and is never a neighbour here or in the dense path).
    """
    n_items = matrix.shape[1]
    x = sp.csr_matrix(matrix, dtype=np.float64)
    by_item = x.T.tocsr()  # items x users
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=0)).ravel())
    keep = min(k_neighbors, max(n_items - 1, 0))
    # Upper bound of each target's co-occurrence entries: its users' history lengths, summed.
    reach = np.cumsum(by_item @ np.diff(x.indptr).astype(np.float64))
    bounds = [0]
    while bounds[-1] < n_items:
        done = reach[bounds[-1] - 1] if bounds[-1] else 0.0
        stop = int(np.searchsorted(reach, done + chunk_pairs, side="right"))
        bounds.append(min(max(stop, bounds[-1] + 1), n_items))
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start, stop in itertools.pairwise(bounds):
        if keep == 0:
            break
        co = (by_item[start:stop] @ x).tocoo()  # [targets, items]: co-occurrence weight
        target = co.row + start
        sims = co.data / (norms[target] * norms[co.col] + shrink + 1e-12)
        other = co.col != target  # an item is not its own neighbour
        chunk = sp.csr_matrix(
            (sims[other], (co.row[other], co.col[other])), shape=(stop - start, n_items)
        )
        del co, target, sims, other
        top = top_k_per_row_sparse(chunk, keep)
        # Stored transposed (row = neighbour j, column = target i), as int32 / float32: the kept
        # neighbours are what stays in memory (up to k_neighbors per item).
        parts.append((top.col.astype(np.int32), (top.row + start).astype(np.int32), top.data))
        del chunk, top
    if not parts:
        return sp.csr_matrix((n_items, n_items))
    rows = np.concatenate([p[0] for p in parts])
    cols = np.concatenate([p[1] for p in parts])
    vals = np.concatenate([p[2].astype(np.float32) for p in parts])
    del parts
    return sp.csr_matrix((vals, (rows, cols)), shape=(n_items, n_items))


def ease_weights(gram: np.ndarray, lam: float) -> np.ndarray:
    """EASE item-item weights from X^T X: B = I - P diag(1/diag(P)), P = (X^T X + lam I)^-1."""
    if lam <= 0:
        raise ValueError("lam must be > 0 (it keeps X^T X + lam I invertible)")
    regularised = np.array(gram, dtype=np.float64, copy=True)
    regularised[np.diag_indices_from(regularised)] += lam
    precision = np.linalg.inv(regularised)
    del regularised
    # In place: B_ij = -P_ij / P_jj off the diagonal, and the diagonal is 1 - P_jj / P_jj = 0.
    precision /= -np.diag(precision)[None, :]
    precision[np.diag_indices_from(precision)] = 0.0
    return precision


class EASERecommender:
    """EASE (Steck 2019): a dense item-item linear model with zero diagonal, in closed form.

    Needs an n_items x n_items float64 matrix (3.2 GB at 20k items), so it refuses catalogs above
    `max_items`. Users without history get the popularity ranking.
    """

    def __init__(self, lam: float = 500.0, max_items: int = 20_000) -> None:
        self.lam = lam
        self.max_items = max_items
        self.weights_: np.ndarray | None = None
        self.interactions_: sp.csr_matrix | None = None
        self.popularity_: np.ndarray | None = None

    def check_size(self, n_items: int) -> None:
        """Raise CatalogTooLargeError when n_items is above the cap."""
        if n_items > self.max_items:
            gb = n_items**2 * 8 / 1e9
            raise CatalogTooLargeError(
                f"EASE needs a dense {n_items} x {n_items} matrix (~{gb:.1f} GB, twice that while "
                f"fitting); {n_items} items exceed max_items={self.max_items}. Use "
                "ItemKNNRecommender, or raise max_items if the memory is there."
            )

    def fit(self, interactions: SparseLike) -> EASERecommender:
        matrix = as_interactions(interactions)
        self.check_size(matrix.shape[1])
        return self.fit_gram(matrix, np.asarray((matrix.T @ matrix).todense()))

    def fit_gram(self, interactions: sp.csr_matrix, gram: np.ndarray) -> EASERecommender:
        """Fit from a precomputed X^T X (lets a lambda sweep compute it once)."""
        self.check_size(gram.shape[0])
        self.weights_ = ease_weights(gram, self.lam)
        self.interactions_ = interactions
        self.popularity_ = np.asarray(interactions.sum(axis=0)).ravel()
        return self

    def _fitted(self) -> tuple[np.ndarray, sp.csr_matrix, np.ndarray]:
        if self.weights_ is None or self.interactions_ is None or self.popularity_ is None:
            raise RuntimeError("EASERecommender is not fitted: call fit first")
        return self.weights_, self.interactions_, self.popularity_

    def score_history(self, history: SparseLike) -> np.ndarray:
        """Scores [n, n_items] for arbitrary histories (rows over the fitted items)."""
        weights, _, _ = self._fitted()
        return np.asarray(as_interactions(history) @ weights)

    def score(self, user_indices: np.ndarray) -> np.ndarray:
        _, interactions, _ = self._fitted()
        users = _user_indices(user_indices, interactions.shape[0])
        return self.score_history(interactions[users])

    def recommend(
        self, user_indices: np.ndarray, k: int, exclude: SparseLike | None = None
    ) -> np.ndarray:
        _, interactions, popularity = self._fitted()
        users = _user_indices(user_indices, interactions.shape[0])
        scores = self.score(users)
        scores[np.diff(interactions.indptr)[users] == 0] = -np.inf  # no history: popularity
        rows = _exclude_rows(exclude, users, popularity.size)
        return _rank_with_fallback(scores, popularity, k, rows)


def tune_ease_lambda(
    train: SparseLike,
    valid_relevant: Relevance,
    lambdas: Sequence[float],
    k: int = 10,
    max_items: int = 20_000,
) -> tuple[float, dict[float, float]]:
    """Pick EASE's lambda by NDCG@k on a validation split (train items excluded from the lists).

    Only users with >=1 validation item are ranked. Ties go to the first lambda listed.
    Returns (best lambda, {lambda: NDCG@k}).
    """
    if not lambdas:
        raise ValueError("lambdas must not be empty")
    matrix = as_interactions(train)
    EASERecommender(max_items=max_items).check_size(matrix.shape[1])
    relevant = relevance_matrix(valid_relevant, n_users=matrix.shape[0], n_items=matrix.shape[1])
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    gram = np.asarray((matrix.T @ matrix).todense())
    scores: dict[float, float] = {}
    for lam in lambdas:
        model = EASERecommender(lam=lam, max_items=max_items).fit_gram(matrix, gram)
        ranked = model.recommend(users, k, exclude=matrix)
        scores[lam] = ndcg_at_k(ranked, relevant[users], k)
    best = max(scores, key=lambda lam: scores[lam])  # max keeps the first of equal values
    return best, scores
