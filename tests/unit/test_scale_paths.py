"""The 1M-item code paths at small sizes: checked index build, sparse collaborative models above the
EASE cap, and filtered retrieval over a forced approximate index (caps and thresholds lowered)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import pytest
import scipy.sparse as sp

from serve_app.stages.retriever import search_batch
from training.baselines import ItemKNNRecommender, sparse_knn_similarity
from training.collaborative import fit_collaborative
from training.config import CollaborativeConfig
from training.features import EncodedLog
from training.index import (
    IndexConfig,
    IndexRecallError,
    build_checked_index,
    build_index,
    clustered_embeddings,
    index_kind,
    index_spec,
    mixture_queries,
)

# --- the checked index build ---------------------------------------------------------------------


def weak_clusters() -> tuple[np.ndarray, np.ndarray]:
    """6,000 weakly clustered items and 100 queries: an IVF scanning one list misses most."""
    items = clustered_embeddings(6_000, 16, n_centres=40, noise=1.5, seed=4)
    return items, mixture_queries(items, 100, seed=5)


def brute_recall(index: faiss.Index, items: np.ndarray, queries: np.ndarray) -> float:
    """recall@100 of `index` against a brute-force top 100, by hand."""
    _, approx = index.search(np.ascontiguousarray(queries, dtype=np.float32), 100)
    exact = np.argsort(-(queries @ items.T), axis=1)[:, :100]
    return float(np.mean([len(set(a) & set(e)) / 100 for a, e in zip(approx, exact, strict=True)]))


def test_build_restores_the_serving_thread_count() -> None:
    items = clustered_embeddings(2_000, 16, n_centres=10, seed=1)
    build_index(items, IndexConfig(exact_threshold=0, kind="hnsw", build_threads=2, threads=1))
    assert faiss.omp_get_max_threads() == 1


def test_forced_hnsw_passes_the_recall_check_and_reports_it() -> None:
    items = clustered_embeddings(4_000, 16, n_centres=20, seed=2)
    queries = mixture_queries(items, 300, seed=3)
    config = IndexConfig(exact_threshold=1_000, kind="hnsw", check_queries=200)
    index, report = build_checked_index(items, queries, config)
    assert index_kind(index) == "hnsw"
    assert report.n_queries == 200 and report.k == 100
    assert report.recall_at_k >= 0.95
    assert report.build_seconds is not None and report.p99_ms > 0


def test_recall_check_refuses_an_index_below_the_floor() -> None:
    items, queries = weak_clusters()
    # One list of 64 scanned per query finds a fraction of the exact top-100.
    weak = IndexConfig(
        exact_threshold=0,
        kind="ivf",
        ivf_nlist=64,
        ivf_nprobe=1,
        strengthen_steps=0,
        below_floor="refuse",
    )
    with pytest.raises(IndexRecallError, match=r"ivf index recall@100 0\.\d+ .* below the floor"):
        build_checked_index(items, queries, weak)


def test_an_index_below_the_floor_falls_back_to_exact_search_and_says_why() -> None:
    items, queries = weak_clusters()
    weak = IndexConfig(
        exact_threshold=0, kind="ivf", ivf_nlist=64, ivf_nprobe=1, strengthen_steps=0
    )
    index, report = build_checked_index(items, queries, weak)
    assert index_kind(index) == "flat" and index.ntotal == len(items)
    assert report.recall_at_k == 1.0
    assert report.fallback is not None and "below the floor" in report.fallback
    _, got = index.search(np.ascontiguousarray(queries[:5], dtype=np.float32), 10)
    want = np.argsort(-(queries[:5] @ items.T), axis=1)[:, :10]
    assert got.tolist() == want.tolist()


def test_recall_check_widens_the_search_before_refusing() -> None:
    items, queries = weak_clusters()
    # nprobe 1 -> 2 -> ... -> 64 = nlist: an IVF scanning every list is exact.
    config = IndexConfig(
        exact_threshold=0, kind="ivf", ivf_nlist=64, ivf_nprobe=1, strengthen_steps=6
    )
    index, report = build_checked_index(items, queries, config)
    nprobe = int(index_spec(index, config)["params"]["nprobe"])
    # Widening doubles nprobe from 1 and stops at the first value that reaches the floor: a power of
    # two above 1 whose recall, computed here by brute force, reaches 0.95 while half of it does not.
    assert nprobe in (2, 4, 8, 16, 32, 64)

    def recall_at(probes: int) -> float:
        index.nprobe = probes
        return brute_recall(index, items, queries)

    assert recall_at(nprobe) >= 0.95
    assert recall_at(nprobe // 2) < 0.95
    assert report.recall_at_k == pytest.approx(recall_at(nprobe), abs=0.01)


def test_recall_check_widens_the_exact_rescoring_of_pq_codes() -> None:
    """Every list scanned already (nprobe = nlist): only re-scoring more PQ candidates exactly can
    lift recall, and the check doubles k_factor until it reaches the floor."""
    items, queries = weak_clusters()
    config = IndexConfig(
        exact_threshold=0,
        kind="ivf_pq",
        ivf_nlist=32,
        ivf_nprobe=32,
        ivf_pq_k_factor=1.0,
        strengthen_steps=6,
    )
    plain = build_index(items, config)
    assert brute_recall(plain, items, queries) < 0.95  # k x 1 PQ candidates: the codes' error shows
    index, report = build_checked_index(items, queries, config)
    params = index_spec(index, config)["params"]
    assert index_kind(index) == "ivf_pq" and report.fallback is None
    assert params["nprobe"] == 32 and params["k_factor"] in (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    assert report.recall_at_k >= 0.95
    assert brute_recall(index, items, queries) == pytest.approx(report.recall_at_k, abs=0.01)


def test_small_catalog_check_is_exact_with_k_capped_at_the_catalog() -> None:
    items = clustered_embeddings(60, 8, n_centres=3, seed=6)
    index, report = build_checked_index(items, mixture_queries(items, 20, seed=7), IndexConfig())
    assert index_kind(index) == "flat"
    assert (report.k, report.recall_at_k) == (60, 1.0)


# --- filtered retrieval ----------------------------------------------------------------------------


def _exact_allowed_top(items: np.ndarray, vector: np.ndarray, allowed: np.ndarray, k: int):
    scores = items[allowed].astype(np.float64) @ vector.astype(np.float64)
    return allowed[np.argsort(-scores, kind="stable")[:k]]


def test_narrow_filter_on_forced_hnsw_returns_the_exact_top_k_of_allowed_items() -> None:
    n, k = 20_000, 20
    items = clustered_embeddings(n, 16, n_centres=50, seed=8)
    index = build_index(items, IndexConfig(exact_threshold=0, kind="hnsw", hnsw_ef_search=64))
    category = np.random.default_rng(9).integers(0, 500, size=n)  # 500 categories, ~40 items each
    allowed = np.flatnonzero(category == 7)
    excluded = np.flatnonzero(category != 7)
    for vector in mixture_queries(items, 10, seed=10):
        rows, scores = search_batch(index, vector[None, :], [k], [excluded], items, 1_000)[0]
        assert rows.tolist() == _exact_allowed_top(items, vector, allowed, k).tolist()
        np.testing.assert_allclose(scores, items[rows] @ vector, rtol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivf_pq"])
def test_broad_filter_uses_the_index_with_a_selector_and_never_returns_excluded_rows(
    kind: Literal["hnsw", "ivf", "ivf_pq"],
) -> None:
    n, k = 20_000, 50
    items = clustered_embeddings(n, 16, n_centres=50, seed=11)
    index = build_index(items, IndexConfig(exact_threshold=0, kind=kind))
    excluded = np.sort(np.random.default_rng(12).choice(n, size=n // 2, replace=False))
    allowed = np.setdiff1d(np.arange(n), excluded)
    hits = 0
    for vector in mixture_queries(items, 10, seed=13):
        rows, _ = search_batch(index, vector[None, :], [k], [excluded], items, 1_000)[0]
        assert len(rows) == k and not np.isin(rows, excluded).any()
        hits += np.intersect1d(rows, _exact_allowed_top(items, vector, allowed, k)).size
    assert hits / (10 * k) >= 0.95


# --- sparse collaborative models ------------------------------------------------------------------


def _random_interactions(seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = sp.random(500, 300, density=0.03, random_state=seed, format="csr")
    x.data[:] = rng.integers(1, 4, size=x.nnz)
    return x


@pytest.mark.parametrize("chunk_pairs", [40, 1 << 30])
def test_sparse_knn_keeps_the_dense_neighbour_weights_of_every_item(chunk_pairs: int) -> None:
    x = _random_interactions(14)
    dense = ItemKNNRecommender(7, 2.0).fit(x).similarity_
    sparse = sparse_knn_similarity(x, 7, 2.0, chunk_pairs=chunk_pairs)
    assert dense is not None and dense.nnz == sparse.nnz
    d, s = dense.tocsc(), sparse.tocsc()
    for item in range(x.shape[1]):  # column = target item; ties may pick different neighbours
        np.testing.assert_allclose(np.sort(s[:, item].data), np.sort(d[:, item].data), rtol=1e-6)
    assert s.diagonal().max() == 0.0 and s.getnnz(axis=0).max() <= 7


def test_sparse_knn_scores_by_hand() -> None:
    # Users: {0, 1}, {0, 1}, {1, 2}. Cosine(0, 1) = 2 / (sqrt(2) * sqrt(3) + 0), cos(1, 2) = 1 / sqrt(3).
    x = sp.csr_matrix(np.array([[1, 1, 0], [1, 1, 0], [0, 1, 1]], dtype=np.float64))
    s = sparse_knn_similarity(x, 1, 0.0).toarray()
    expected = np.zeros((3, 3))
    expected[1, 0] = 2 / np.sqrt(6)  # item 0's one neighbour: 1
    expected[0, 1] = 2 / np.sqrt(6)  # item 1's best: 0 (0.816 > 0.577)
    expected[1, 2] = 1 / np.sqrt(3)  # item 2's one neighbour: 1
    np.testing.assert_allclose(s, expected, atol=1e-6)


def test_item_knn_above_its_dense_cap_switches_to_the_sparse_path() -> None:
    x = _random_interactions(15)
    small_cap = ItemKNNRecommender(5, 1.0, dense_max_items=100).fit(x).similarity_
    assert small_cap is not None
    assert (small_cap != sparse_knn_similarity(x, 5, 1.0)).nnz == 0


def _log(n_users: int, n_items: int, n_events: int, seed: int) -> EncodedLog:
    rng = np.random.default_rng(seed)
    return EncodedLog(
        user_ids=np.array([f"u{i}" for i in range(n_users)]),
        user=rng.integers(0, n_users, n_events),
        item=rng.integers(0, n_items, n_events),
        category=np.zeros(n_events, dtype=np.int64),
        ts=np.arange(n_events, dtype=np.int64) * 10**9,
        weight=np.ones(n_events, dtype=np.float32),
        positive=np.ones(n_events, dtype=bool),
        is_view=np.zeros(n_events, dtype=bool),
        n_items=n_items,
        n_categories=1,
    )


def test_above_the_ease_cap_knn_and_transitions_stay_on_and_match_the_small_cap_fit() -> None:
    log = _log(60, 40, 600, seed=16)
    under = fit_collaborative(log, None, CollaborativeConfig())
    over = fit_collaborative(log, None, CollaborativeConfig(max_items=39, knn_dense_max_items=39))
    assert under.ease.nnz > 0 and over.ease.nnz == 0 and over.ease.shape == (40, 40)
    assert over.transitions.nnz > 0 and (over.transitions != under.transitions).nnz == 0
    assert over.knn.nnz == under.knn.nnz > 0
    for item in range(40):
        np.testing.assert_allclose(
            np.sort(over.knn.tocsc()[:, item].data), np.sort(under.knn.tocsc()[:, item].data)
        )


def test_switched_off_models_are_empty_and_not_fit() -> None:
    log = _log(30, 20, 200, seed=17)
    model = fit_collaborative(log, None, CollaborativeConfig(ease=False, knn=False))
    assert model.ease.nnz == 0 and model.knn.nnz == 0 and model.transitions.nnz > 0


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_pq"])
def test_warming_reads_every_page_of_the_vectors_searched_at_random(
    kind: Literal["flat", "hnsw", "ivf_pq"], tmp_path: Path
) -> None:
    """The flat storage of a memory-mapped index (as a Retriever loads it) and the item embeddings
    are covered whole; an IVF-Flat index has no flat storage to fault in."""
    from serve_app.stages.retriever import touch_mapped_vectors
    from training.index import save_index

    items = clustered_embeddings(3_000, 16, n_centres=10, seed=11)
    path = tmp_path / "index.faiss"
    config = (
        IndexConfig()  # 3,000 items: under the exact threshold
        if kind == "flat"
        else IndexConfig(exact_threshold=0, kind=kind)
    )
    save_index(build_index(items, config), path)
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    assert index_kind(index) == kind
    assert touch_mapped_vectors(index) == items.nbytes
    assert touch_mapped_vectors(index, items) == 2 * items.nbytes
    _, ids = index.search(items[:3], 1)
    assert ids[:, 0].tolist() == [0, 1, 2]  # still searches after the reads


def test_warming_an_ivf_flat_index_covers_the_embeddings_only() -> None:
    from serve_app.stages.retriever import touch_mapped_vectors

    items = clustered_embeddings(3_000, 16, n_centres=10, seed=11)
    index = build_index(items, IndexConfig(exact_threshold=0, kind="ivf"))
    assert touch_mapped_vectors(index) == 0
    assert touch_mapped_vectors(index, items) == items.nbytes
