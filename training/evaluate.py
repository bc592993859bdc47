"""Offline evaluation: ranking metrics over top-k lists, the score -> top-k helper, and reporting.

Pure numpy (no model, no MLflow): `pipeline.py` feeds it rankings from any system (two-tower,
ranker, `baselines.py`) and logs the returned dict; `bench/` prints the same table.

Conventions used by every function here:
- users and items are integer indices; a ranking is an int64 array [n_users, K] of item indices,
  best first, padded at the end with -1 when a list has fewer than K items; items must not repeat
  within a row (duplicates would be counted twice, so they are rejected);
- `relevant` is either a list (one entry per ranking row) of int arrays of relevant item indices, or
  a scipy sparse matrix [n_users, n_items] whose nonzero entries are relevant (`relevance_matrix`
  turns the first into the second);
- relevance is binary (graded weights are ignored, NDCG included);
- accuracy metrics (recall, NDCG, hit rate, MRR) are means over the users with at least one
  relevant item: a user with nothing to find can neither succeed nor fail.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeAlias

import numpy as np
import scipy.sparse as sp
from rich.console import Console
from rich.table import Table

Relevance: TypeAlias = Sequence[np.ndarray] | sp.spmatrix | sp.sparray

# Rows per block in `top_k_from_scores`: bounds the temporary masks to a few MB per block.
_TOPK_BLOCK_ELEMENTS = 1 << 22
# Users per block in `relevance_hits`: the (user, item) bitmap stays under 32 MB.
_HITS_BLOCK_ELEMENTS = 1 << 25


def relevance_matrix(
    relevant: Relevance, n_users: int | None = None, n_items: int | None = None
) -> sp.csr_matrix:
    """Binary CSR [n_users, n_items] (sorted indices, no duplicates) from either relevance form."""
    if sp.issparse(relevant):
        matrix = sp.csr_matrix(relevant, copy=True)
        matrix.sum_duplicates()
        matrix.eliminate_zeros()
        matrix.data = np.ones_like(matrix.data, dtype=np.float64)
        matrix.sort_indices()
        if n_users is not None and matrix.shape[0] != n_users:
            raise ValueError(f"relevance has {matrix.shape[0]} rows, expected {n_users}")
        if n_items is not None and matrix.shape[1] > n_items:
            raise ValueError(f"relevance has {matrix.shape[1]} columns, more than {n_items} items")
        if n_items is not None and matrix.shape[1] < n_items:
            matrix.resize((matrix.shape[0], n_items))
        return matrix
    rows = [np.asarray(r, dtype=np.int64).ravel() for r in relevant]
    if n_users is not None and len(rows) != n_users:
        raise ValueError(f"relevance has {len(rows)} users, expected {n_users}")
    items = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    if items.size and items.min() < 0:
        raise ValueError("relevant item indices must be >= 0")
    width = int(items.max()) + 1 if items.size else 0
    if n_items is not None:
        if width > n_items:
            raise ValueError(f"relevant item index {width - 1} out of range for {n_items} items")
        width = n_items
    # One global sort of (user, item) keys dedupes and orders every row at once.
    owners = np.repeat(np.arange(len(rows), dtype=np.int64), [r.size for r in rows])
    keys = np.unique(owners * max(width, 1) + items)
    indices = keys % max(width, 1)
    indptr = np.searchsorted(keys // max(width, 1), np.arange(len(rows) + 1), side="left")
    data = np.ones(indices.size, dtype=np.float64)
    return sp.csr_matrix((data, indices, indptr), shape=(len(rows), width))


def _check_ranked(ranked: np.ndarray) -> np.ndarray:
    ranked = np.asarray(ranked)
    if ranked.ndim != 2 or not np.issubdtype(ranked.dtype, np.integer):
        raise ValueError(f"ranked must be a 2-D integer array, got {ranked.dtype} {ranked.shape}")
    ranked = ranked.astype(np.int64, copy=False)
    if ranked.size and ranked.min() < -1:
        raise ValueError("ranked may contain item indices >= 0 and -1 padding only")
    if ranked.shape[1] > 1:
        ordered = np.sort(ranked, axis=1)
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if repeated.any():
            row = int(np.flatnonzero(repeated.any(axis=1))[0])
            raise ValueError(f"ranked row {row} repeats an item")
    return ranked


def _check_k(k: int) -> int:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def relevance_hits(ranked: np.ndarray, relevant: Relevance) -> tuple[np.ndarray, np.ndarray]:
    """(hits [n_users, K] bool: ranked[u, j] is relevant to u; n_relevant [n_users] int)."""
    ranked = _check_ranked(ranked)
    rel = relevance_matrix(relevant, n_users=ranked.shape[0])
    n_relevant = np.diff(rel.indptr).astype(np.int64)
    # Membership through a flat boolean bitmap of (user, item) per block of users: O(nK) lookups
    # that stay in cache, several times faster than a binary search over sorted keys.
    width = max(rel.shape[1], int(ranked.max(initial=-1)) + 1, 1)
    valid = ranked >= 0
    hits = np.zeros(ranked.shape, dtype=bool)
    block = max(1, _HITS_BLOCK_ELEMENTS // width)
    for start in range(0, ranked.shape[0], block):
        stop = min(start + block, ranked.shape[0])
        lo, hi = rel.indptr[start], rel.indptr[stop]
        local_rows = np.repeat(np.arange(stop - start, dtype=np.int64), n_relevant[start:stop])
        bitmap = np.zeros((stop - start) * width, dtype=bool)
        bitmap[local_rows * width + rel.indices[lo:hi]] = True
        keys = np.arange(stop - start, dtype=np.int64)[:, None] * width + ranked[start:stop]
        hits[start:stop] = bitmap[np.where(valid[start:stop], keys, 0)] & valid[start:stop]
    return hits, n_relevant


def _mean_over(values: np.ndarray, mask: np.ndarray) -> float:
    return float(values[mask].mean()) if mask.any() else math.nan


def _recall(hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    found = hits[:, :k].sum(axis=1)
    evaluated = n_rel > 0
    return _mean_over(found / np.maximum(n_rel, 1), evaluated)


def _ndcg_values(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    """Each user's NDCG@k; NaN for a user with nothing relevant."""
    top = hits[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    dcg: np.ndarray = top @ discounts[: top.shape[1]]
    # The ideal list puts min(|rel|, k) relevant items first, even when the ranking is shorter than
    # k: a truncated ranking is penalised for what it did not show.
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(n_rel, k)]
    evaluated = n_rel > 0
    return np.where(evaluated, dcg / np.where(evaluated, ideal, 1.0), np.nan)


def _ndcg(hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    return mean_ndcg(_ndcg_values(hits, n_rel, k))


def mean_ndcg(per_user: np.ndarray) -> float:
    """`ndcg_at_k` from `ndcg_per_user`'s values: their mean over the users with a figure (NaN:
    nothing relevant, or not scored), NaN when none has one."""
    return _mean_over(per_user, ~np.isnan(per_user))


def _hit_rate(hits: np.ndarray, n_rel: np.ndarray, k: int, users: np.ndarray) -> float:
    found = np.count_nonzero(hits[:, :k], axis=1) > 0
    return _mean_over(found.astype(np.float64), users & (n_rel > 0))


def _mrr(hits: np.ndarray, n_rel: np.ndarray) -> float:
    first = np.argmax(hits, axis=1)
    reciprocal = np.where(hits.any(axis=1), 1.0 / (first + 1.0), 0.0)
    return _mean_over(reciprocal, n_rel > 0)


def recall_at_k(ranked: np.ndarray, relevant: Relevance, k: int) -> float:
    """Mean over users with >=1 relevant item of |top-k ∩ relevant| / |relevant|.

    The denominator is |relevant|, not the min(|relevant|, k) variant: a user with 20 relevant items
    scores at most 0.5 at k=10.
    """
    hits, n_rel = relevance_hits(ranked, relevant)
    return _recall(hits, n_rel, _check_k(k))


def ndcg_at_k(ranked: np.ndarray, relevant: Relevance, k: int) -> float:
    """Binary NDCG@k: sum of 1/log2(rank+1) over hits, over the ideal for min(|rel|, k) hits."""
    hits, n_rel = relevance_hits(ranked, relevant)
    return _ndcg(hits, n_rel, _check_k(k))


def ndcg_per_user(ranked: np.ndarray, relevant: Relevance, k: int) -> np.ndarray:
    """`ndcg_at_k` user by user ([n_users] float64, NaN where a user has nothing relevant): what a
    paired comparison of two rankings of the same users needs."""
    hits, n_rel = relevance_hits(ranked, relevant)
    return _ndcg_values(hits, n_rel, _check_k(k))


def hit_rate_at_k(ranked: np.ndarray, relevant: Relevance, k: int) -> float:
    """Share of users with >=1 relevant item who find at least one of them in their top k."""
    hits, n_rel = relevance_hits(ranked, relevant)
    return _hit_rate(hits, n_rel, _check_k(k), np.ones(hits.shape[0], dtype=bool))


def mrr(ranked: np.ndarray, relevant: Relevance) -> float:
    """Mean reciprocal rank of the first relevant item in the whole ranking (0 when none is)."""
    hits, n_rel = relevance_hits(ranked, relevant)
    return _mrr(hits, n_rel)


def cold_start_hit_rate(
    ranked: np.ndarray, relevant: Relevance, k: int, cold_mask: np.ndarray
) -> float:
    """Hit rate@k over the users in `cold_mask` that have >=1 relevant item; NaN if none has."""
    hits, n_rel = relevance_hits(ranked, relevant)
    return _hit_rate(hits, n_rel, _check_k(k), _check_mask(cold_mask, hits.shape[0]))


def _check_mask(mask: np.ndarray, n_users: int) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (n_users,):
        raise ValueError(f"cold_mask must have shape ({n_users},), got {mask.shape}")
    return mask


def catalog_coverage_at_k(ranked: np.ndarray, k: int, n_items: int) -> float:
    """Distinct items appearing in any top-k list, over n_items."""
    top = _check_ranked(ranked)[:, : _check_k(k)]
    items = top[top >= 0]
    if items.size and items.max() >= n_items:
        raise ValueError(f"ranked item index {int(items.max())} out of range for {n_items} items")
    seen = np.zeros(n_items, dtype=bool)
    seen[items] = True
    return float(seen.sum() / n_items) if n_items else math.nan


def intra_list_diversity(ranked: np.ndarray, k: int, item_categories: np.ndarray) -> float:
    """Mean over lists of the share of item pairs in the top k whose categories differ.

    `item_categories` holds one label (int or str) per item. Lists with fewer than two items have
    no pairs and are left out of the mean; NaN when no list has two items.
    """
    top = _check_ranked(ranked)[:, : _check_k(k)]
    _, codes = np.unique(np.asarray(item_categories), return_inverse=True)
    codes = codes.ravel().astype(np.int64)
    valid = top >= 0
    if valid.any() and top[valid].max() >= codes.size:
        raise ValueError(f"ranked item {int(top[valid].max())} has no category")
    n_per_list = valid.sum(axis=1)
    total_pairs = n_per_list * (n_per_list - 1) / 2
    # Same-category pairs per list: count each (list, category) group of size c as c(c-1)/2.
    n_codes = int(codes.max(initial=0)) + 1
    keys = np.nonzero(valid)[0] * n_codes + codes[top[valid]]
    group_keys, group_sizes = np.unique(keys, return_counts=True)
    same = np.bincount(
        group_keys // n_codes,
        weights=group_sizes * (group_sizes - 1) / 2,
        minlength=top.shape[0],
    )
    scored = total_pairs > 0
    return _mean_over(1.0 - same / np.where(scored, total_pairs, 1.0), scored)


def embedding_diversity(ranked: np.ndarray, k: int, item_embeddings: np.ndarray) -> float:
    """Mean over lists of 1 - mean pairwise cosine similarity of the top-k item embeddings.

    A zero embedding counts as orthogonal to everything; lists with fewer than two items are left
    out.
    """
    top = _check_ranked(ranked)[:, : _check_k(k)]
    emb = np.asarray(item_embeddings, dtype=np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit = emb / np.where(norms > 0, norms, 1.0)
    valid = top >= 0
    vectors = np.where(valid[..., None], unit[np.where(valid, top, 0)], 0.0)
    # Sum of pairwise dot products = (|sum v|^2 - sum |v|^2) / 2: O(k d) per list, not O(k^2 d).
    summed = vectors.sum(axis=1)
    pair_sum = ((summed**2).sum(axis=1) - (vectors**2).sum(axis=(1, 2))) / 2
    n_per_list = valid.sum(axis=1)
    total_pairs = n_per_list * (n_per_list - 1) / 2
    scored = total_pairs > 0
    return _mean_over(1.0 - pair_sum / np.where(scored, total_pairs, 1.0), scored)


def evaluate_ranking(
    ranked: np.ndarray,
    relevant: Relevance,
    *,
    n_items: int,
    item_categories: np.ndarray | None,
    cold_mask: np.ndarray | None = None,
    ks: Sequence[int] = (10, 50, 100),
) -> dict[str, float]:
    """All offline metrics of one system in one pass over the hits.

    Recall is reported at every k in `ks`; NDCG, hit rate, coverage, diversity and cold-start hit
    rate at the smallest k. With the default ks the keys are exactly: recall@10, recall@50,
    recall@100, ndcg@10, hit_rate@10, mrr, coverage@10, diversity@10, cold_start_hit_rate@10
    (NaN without cold users), users (how many users had >=1 relevant item).
    """
    if not ks:
        raise ValueError("ks must name at least one k")
    ks = [_check_k(k) for k in ks]
    k0 = min(ks)
    hits, n_rel = relevance_hits(ranked, relevant)
    everyone = np.ones(hits.shape[0], dtype=bool)
    out: dict[str, float] = {f"recall@{k}": _recall(hits, n_rel, k) for k in ks}
    out[f"ndcg@{k0}"] = _ndcg(hits, n_rel, k0)
    out[f"hit_rate@{k0}"] = _hit_rate(hits, n_rel, k0, everyone)
    out["mrr"] = _mrr(hits, n_rel)
    out[f"coverage@{k0}"] = catalog_coverage_at_k(ranked, k0, n_items)
    out[f"diversity@{k0}"] = (
        intra_list_diversity(ranked, k0, item_categories)
        if item_categories is not None
        else math.nan
    )
    out[f"cold_start_hit_rate@{k0}"] = (
        _hit_rate(hits, n_rel, k0, _check_mask(cold_mask, hits.shape[0]))
        if cold_mask is not None
        else math.nan
    )
    out["users"] = int((n_rel > 0).sum())
    return out


def score_block_rows(n_items: int, max_elements: int = 1 << 24, most: int = 1024) -> int:
    """Users per block of a dense [users, n_items] score matrix: at most `max_elements` scores
    (64 MB of float32) and `most` users, so scoring a 1M-item catalog holds a few users' rows at a
    time; each block is reduced to its top k before the next."""
    return max(1, min(most, max_elements // max(n_items, 1)))


def top_k_from_scores(
    scores: np.ndarray, k: int, exclude: sp.spmatrix | sp.sparray | None = None
) -> np.ndarray:
    """Top-k item indices per row of a dense score matrix [n_users, n_items], best first.

    Entries of `exclude` (same shape, nonzero = excluded) are set to -inf, and -inf / NaN scores are
    never returned: a row with fewer than k eligible items is padded with -1. Ties are broken by the
    lower item index, so the result does not depend on the partition algorithm.
    """
    k = _check_k(k)
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D, got shape {scores.shape}")
    n_users, n_items = scores.shape
    if exclude is not None:
        exclude = sp.csr_matrix(exclude)
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude shape {exclude.shape} != scores shape {scores.shape}")
        exclude.eliminate_zeros()
    kk = min(k, n_items)
    out = np.full((n_users, k), -1, dtype=np.int64)
    if kk == 0 or n_users == 0:
        return out
    block = max(1, _TOPK_BLOCK_ELEMENTS // max(n_items, 1))
    for start in range(0, n_users, block):
        stop = min(start + block, n_users)
        # A float64 copy: the caller's array is never modified, and -inf marks ineligible entries.
        chunk = scores[start:stop].astype(np.float64, copy=True)
        chunk[np.isnan(chunk)] = -np.inf
        if exclude is not None:
            sub = exclude[start:stop]
            chunk[np.repeat(np.arange(stop - start), np.diff(sub.indptr)), sub.indices] = -np.inf
        kth = np.partition(chunk, n_items - kk, axis=1)[:, n_items - kk]
        above = chunk > kth[:, None]
        tied = chunk == kth[:, None]
        # Exactly kk entries per row: everything above the k-th value, then the lowest-index ties.
        room = kk - above.sum(axis=1)
        chosen = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= room[:, None]))
        cols = np.nonzero(chosen)[1].reshape(stop - start, kk)  # row-major: ascending item index
        vals = np.take_along_axis(chunk, cols, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")  # stable keeps lower index first on ties
        cols = np.take_along_axis(cols, order, axis=1)
        vals = np.take_along_axis(vals, order, axis=1)
        out[start:stop, :kk] = np.where(np.isneginf(vals), -1, cols)
    return out


def _format_metric(name: str, value: float) -> str:
    if math.isnan(value):
        return "–"
    if name == "users":
        return f"{int(value):d}"
    return f"{value:.4f}"


def metrics_table(results: Mapping[str, Mapping[str, float]], title: str) -> Table:
    """A rich table with one row per system and one column per metric (first-seen order)."""
    columns: list[str] = []
    for metrics in results.values():
        columns.extend(name for name in metrics if name not in columns)
    table = Table(title=title)
    table.add_column("system", style="bold")
    for name in columns:
        table.add_column(name, justify="right")
    for system, metrics in results.items():
        cells = [_format_metric(name, metrics[name]) if name in metrics else "" for name in columns]
        table.add_row(system, *cells)
    return table


def print_metrics_table(
    results: Mapping[str, Mapping[str, float]], title: str, console: Console | None = None
) -> None:
    """Print `metrics_table(results, title)` to `console` (stdout by default)."""
    (console or Console()).print(metrics_table(results, title))


def _json_value(value: float) -> float | int | None:
    if isinstance(value, int | np.integer):
        return int(value)
    return None if math.isnan(value) else float(value)


def write_metrics_json(results: Mapping[str, Mapping[str, float]], path: Path | str) -> Path:
    """Write results as strict JSON ({system: {metric: value}}, NaN as null) and return the path."""
    clean = {
        system: {name: _json_value(v) for name, v in metrics.items()}
        for system, metrics in results.items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    return path
