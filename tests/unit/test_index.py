"""Unit tests of the offline FAISS index stage (training/index.py), on real FAISS indexes."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from serve_app.schemas import IndexSpec
from training.index import (
    IndexConfig,
    build_index,
    clustered_embeddings,
    default_nlist,
    index_kind,
    index_spec,
    load_index,
    measure_index,
    mixture_queries,
    recall_at_k,
    save_index,
    search,
)


def brute_force_top_k(items: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by inner product with plain numpy, independent of FAISS."""
    scores = queries.astype(np.float64) @ items.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_recall_at_k_counts_overlap_by_hand() -> None:
    approx = np.array([[1, 2, 3], [4, 5, 6]])
    exact = np.array([[1, 2, 9], [7, 8, 6]])
    # query 0 shares {1, 2} -> 2/3, query 1 shares {6} -> 1/3; mean = 0.5
    assert recall_at_k(approx, exact, 3) == pytest.approx(0.5)


def test_recall_at_k_ignores_faiss_padding() -> None:
    approx = np.array([[1, -1, -1]])
    exact = np.array([[1, 2, -1]])
    # only item 1 is a real hit; the -1 padding must not count as a match
    assert recall_at_k(approx, exact, 3) == pytest.approx(1 / 3)


def test_default_nlist_is_four_root_n_capped_by_training_points() -> None:
    assert default_nlist(100_000) == 1265  # 4 * 316.23 = 1264.9
    assert default_nlist(1_000) == 25  # 4 * 31.6 = 126 lists, but 1000 // 39 points each = 25


def test_small_catalog_gets_exact_flat_index() -> None:
    items = clustered_embeddings(2_000, 16, n_centres=10, seed=3)
    queries = mixture_queries(items, 50, seed=4)
    index = build_index(items, IndexConfig())
    assert index_kind(index) == "flat"
    assert index_spec(index, IndexConfig())["type"] == "flat"

    scores, ids = search(index, queries, 20)
    expected = brute_force_top_k(items, queries, 20)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(
        scores, np.take_along_axis(queries @ items.T, expected, axis=1), rtol=1e-5
    )
    report = measure_index(index, items, queries, k=20)
    assert report.recall_at_k == 1.0
    assert report.n_queries == 50
    assert 0 < report.p50_ms <= report.p99_ms
    assert report.qps > 0


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivf_pq"])
def test_approximate_index_above_threshold_with_spec_for_manifest(kind: str) -> None:
    items = clustered_embeddings(4_000, 16, n_centres=20, seed=5)
    config = IndexConfig(exact_threshold=1_000, kind=kind)
    index = build_index(items, config)
    spec = IndexSpec(**index_spec(index, config))
    assert spec.type == kind
    assert spec.params["ntotal"] == 4_000
    assert spec.params["dim"] == 16
    if kind == "hnsw":
        assert (spec.params["m"], spec.params["ef_search"]) == (32, 256)
    else:
        # 4 * sqrt(4000) = 253 lists, capped at 4000 // 39 = 102 so k-means has 39 points a list
        assert (spec.params["nlist"], spec.params["nprobe"]) == (102, 64)
    if kind == "ivf_pq":
        assert (spec.params["pq_m"], spec.params["k_factor"]) == (16, 16.0)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivf_pq"])
def test_save_load_round_trip_returns_identical_results(kind: str, tmp_path: Path) -> None:
    items = clustered_embeddings(3_000, 16, n_centres=20, seed=6)
    queries = mixture_queries(items, 40, seed=7)
    threshold = 10_000 if kind == "flat" else 0
    config = IndexConfig(exact_threshold=threshold, kind="hnsw" if kind == "flat" else kind)
    index = build_index(items, config)
    assert index_kind(index) == kind
    path = tmp_path / "index.faiss"
    save_index(index, path)

    loaded = load_index(path)
    assert index_kind(loaded) == kind
    before = search(index, queries, 10)
    after = search(loaded, queries, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    assert index_spec(loaded, config) == index_spec(index, config)


def test_load_index_applies_search_params_from_config(tmp_path: Path) -> None:
    items = clustered_embeddings(3_000, 16, n_centres=20, seed=8)
    hnsw_path, ivf_path = tmp_path / "hnsw.faiss", tmp_path / "ivf.faiss"
    save_index(build_index(items, IndexConfig(exact_threshold=0, kind="hnsw")), hnsw_path)
    save_index(build_index(items, IndexConfig(exact_threshold=0, kind="ivf")), ivf_path)
    pq_path = tmp_path / "ivf_pq.faiss"
    save_index(build_index(items, IndexConfig(exact_threshold=0, kind="ivf_pq")), pq_path)
    serving = IndexConfig(hnsw_ef_search=48, ivf_nprobe=5, ivf_pq_k_factor=2.5)
    hnsw, ivf, hnsw_as_saved = (
        load_index(hnsw_path, serving),
        load_index(ivf_path, serving),
        load_index(hnsw_path),
    )
    pq_params = index_spec(load_index(pq_path, serving), serving)["params"]
    assert (pq_params["nprobe"], pq_params["k_factor"]) == (5, 2.5)
    assert index_spec(load_index(pq_path), serving)["params"]["k_factor"] == 16.0  # as saved
    assert isinstance(hnsw, faiss.IndexHNSWFlat)
    assert isinstance(ivf, faiss.IndexIVFFlat)
    assert isinstance(hnsw_as_saved, faiss.IndexHNSWFlat)
    assert hnsw.hnsw.efSearch == 48
    assert ivf.nprobe == 5
    assert hnsw_as_saved.hnsw.efSearch == 256


def test_wrong_dimension_query_raises_clear_value_error() -> None:
    items = clustered_embeddings(500, 16, n_centres=5)
    index = build_index(items, IndexConfig())
    with pytest.raises(ValueError, match=r"shape \(n, 16\).*got \(3, 8\)"):
        search(index, np.ones((3, 8), dtype=np.float32), 5)


def test_single_vector_query_and_k_above_catalog_size() -> None:
    items = clustered_embeddings(30, 8, n_centres=3)
    index = build_index(items, IndexConfig())
    scores, ids = search(index, items[7], 100)
    assert ids.shape == (1, 30)  # capped at the 30 items, no -1 padding
    assert ids[0, 0] == 7  # a unit vector's nearest neighbour by inner product is itself
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_unnormalised_embeddings_are_refused() -> None:
    items = clustered_embeddings(100, 8, n_centres=3) * 2.0
    with pytest.raises(ValueError, match="L2-normalised"):
        build_index(items, IndexConfig())


@pytest.mark.slow
def test_default_index_reaches_recall_095_on_100k_clustered_catalog() -> None:
    items = clustered_embeddings(100_000, 64, n_centres=100, noise=1.0, seed=0)
    queries = mixture_queries(items, 200, seed=1)
    config = IndexConfig()
    index = build_index(items, config)
    assert index_kind(index) == config.kind
    exact = brute_force_top_k(items, queries, 100)
    report = measure_index(index, items, queries, k=100, exact=exact)
    assert report.recall_at_k >= 0.95, report
