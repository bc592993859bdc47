"""The bundle's collaborative models: EASE, item-kNN, next-item transitions and same-order
co-occurrence (basket: item-kNN over sessions instead of users) over a log.

Fit on positive first interactions before a cutoff (the same history the user states read), stored in
the bundle as `collaborative.npz` (CSR arrays, loaded without pickle) and applied on both sides by
`serve_app.contract.cf_scores`. EASE is dense n x n when fit, so it is fit only up to
`collaborative.max_items` (above: an empty matrix); only its `ease_top_k` largest weights per item are
kept, so the bundle and a request's scoring stay sparse. Transitions and item-kNN are sparse and stay
on at any catalog size (1M items: see bench/collaborative_fit.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from serve_app.contract import Collaborative
from training.baselines import EASERecommender, ItemKNNRecommender
from training.config import CollaborativeConfig
from training.features import EncodedLog, first_positives

FILE_NAME = "collaborative.npz"
MATRICES = ("ease", "knn", "transitions", "basket")


def top_k_per_row(dense: np.ndarray, k: int) -> sp.csr_matrix:
    """The `k` largest positive entries of each row, as float32 CSR."""
    n_rows, n_cols = dense.shape
    k = min(k, n_cols)
    top = (
        np.argpartition(-dense, k - 1, axis=1)[:, :k]
        if k < n_cols
        else np.tile(np.arange(n_cols), (n_rows, 1))
    )
    values = np.take_along_axis(dense, top, axis=1)
    keep = values > 0
    rows = np.broadcast_to(np.arange(n_rows)[:, None], top.shape)[keep]
    return sp.csr_matrix(
        (values[keep].astype(np.float32), (rows, top[keep])), shape=(n_rows, n_cols)
    )


def transition_matrix(log: EncodedLog, mask: np.ndarray, max_gap: int) -> sp.csr_matrix:
    """T[a, b] = sum over users of 1/gap where b is `gap` <= `max_gap` steps after a in that user's
    first positive interactions (time order, ties in log order)."""
    first = first_positives(log, mask)  # time order
    order = np.argsort(log.user[first], kind="stable")
    user, item = log.user[first][order], log.item[first][order]
    rows, cols, vals = [], [], []
    for gap in range(1, max_gap + 1):
        same = user[gap:] == user[:-gap]
        rows.append(item[:-gap][same])
        cols.append(item[gap:][same])
        vals.append(np.full(int(same.sum()), 1.0 / gap, dtype=np.float32))
    t = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(log.n_items, log.n_items),
        dtype=np.float32,
    )
    t.sum_duplicates()
    return t


def sessions_before(log: EncodedLog, mask: np.ndarray) -> sp.csr_matrix:
    """0/1 [n_sessions, n_items]: the items of each session (order) with a positive event within
    `mask`; no rows when the log has no session ids."""
    if log.session is None:
        return sp.csr_matrix((0, log.n_items), dtype=np.float32)
    pos = np.flatnonzero(mask & log.positive & (log.session >= 0))
    m = sp.csr_matrix(
        (np.ones(len(pos), dtype=np.float32), (log.session[pos], log.item[pos])),
        shape=(int(log.session.max()) + 1, log.n_items),
    )
    m.data[:] = 1.0
    return m


def interactions_before(log: EncodedLog, mask: np.ndarray) -> sp.csr_matrix:
    """0/1 [n_users, n_items]: positive interactions within `mask`."""
    pos = np.flatnonzero(mask & log.positive)
    m = sp.csr_matrix(
        (np.ones(len(pos), dtype=np.float32), (log.user[pos], log.item[pos])),
        shape=(len(log.user_ids), log.n_items),
    )
    m.data[:] = 1.0
    return m


def fit_collaborative(
    log: EncodedLog, cutoff: pd.Timestamp | None, config: CollaborativeConfig
) -> Collaborative:
    """The switched-on models from positive interactions before `cutoff` (None: all); a model
    switched off, or EASE above `config.max_items` (dense n x n while fitting), is an empty matrix.

    Transitions and item-kNN are sparse (O(events) and O(co-occurring pairs)), so they stay on at
    any catalog size; kNN scores dense blocks up to `knn_dense_max_items`, sparse chunks above.
    """
    mask = log.before(cutoff) if cutoff is not None else np.ones(len(log.ts), dtype=bool)
    n = log.n_items
    empty = sp.csr_matrix((n, n), dtype=np.float32)
    history = interactions_before(log, mask) if (config.ease or config.knn) else None
    ease, knn = empty, empty
    if config.ease and history is not None and n <= config.max_items:
        weights = EASERecommender(lam=config.ease_lambda, max_items=config.max_items).fit(history)
        assert weights.weights_ is not None
        ease = top_k_per_row(weights.weights_, config.ease_top_k)
    if config.knn and history is not None:
        model = ItemKNNRecommender(
            config.knn_neighbors, config.knn_shrink, dense_max_items=config.knn_dense_max_items
        ).fit(history)
        knn = sp.csr_matrix(model.similarity_, dtype=np.float32)
    basket = empty
    if config.basket:
        sessions = sessions_before(log, mask)
        if sessions.nnz:
            basket = sp.csr_matrix(
                ItemKNNRecommender(
                    config.basket_neighbors,
                    config.knn_shrink,
                    dense_max_items=config.knn_dense_max_items,
                )
                .fit(sessions)
                .similarity_,
                dtype=np.float32,
            )
    return Collaborative(
        ease=ease,
        knn=knn,
        transitions=transition_matrix(log, mask, config.next_gap) if config.transitions else empty,
        last_items=config.last_items,
        per_source=config.per_source,
        basket=basket,
        basket_items=config.basket_items,
    )


def save_collaborative(model: Collaborative, directory: Path) -> dict[str, Any]:
    """Write `collaborative.npz` into a bundle directory; returns the manifest's entry."""
    arrays: dict[str, np.ndarray] = {}
    for name in MATRICES:
        m: sp.csr_matrix = getattr(model, name)
        m.sort_indices()
        arrays[f"{name}_indptr"] = m.indptr.astype(np.int64)
        arrays[f"{name}_indices"] = m.indices.astype(np.int32)
        arrays[f"{name}_data"] = m.data.astype(np.float32)
    with (directory / FILE_NAME).open("wb") as out:
        np.savez(out, allow_pickle=False, **arrays)
    return {
        "file": FILE_NAME,
        "last_items": model.last_items,
        "per_source": model.per_source,
        "basket_items": model.basket_items,
        "nnz": {name: int(getattr(model, name).nnz) for name in MATRICES},
    }
