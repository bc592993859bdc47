"""The 1M-item paths of `recserve train` on the tiny data: the index forced approximate and
checked, EASE past its (lowered) cap while transitions and sparse item-kNN stay on, and the bundle
served through the graph's stage functions."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.bundle import load_bundle
from tests.integration.test_pipeline import tiny_settings
from training.pipeline import FINAL_SYSTEM, run_pipeline
from training.synthetic import generate

pytestmark = pytest.mark.integration


def test_forced_hnsw_and_sparse_collaborative_models_above_the_ease_cap(tmp_path: Path) -> None:
    settings = tiny_settings(
        tmp_path / "data",
        register_bundle=False,
        index={"exact_threshold": 1, "kind": "hnsw", "check_users": 200},
        collaborative={"max_items": 10, "knn_dense_max_items": 10},
    )
    dataset = generate(settings.synthetic, progress=False)
    n_items = len(dataset.catalog)
    assert n_items > 10  # above both lowered caps
    result = run_pipeline(settings, dataset, progress=False)

    bundle = load_bundle(result.bundle_dir)
    spec = bundle.manifest.index
    assert spec.type == "hnsw" and spec.params["ntotal"] == n_items
    assert spec.recall_floor == 0.95 and spec.recall_queries == 200
    assert spec.recall_at_100 is not None and spec.recall_at_100 >= 0.95
    assert spec.search_p99_ms is not None and spec.build_seconds is not None
    cf = bundle.collaborative
    assert cf is not None
    assert cf.ease.nnz == 0 and cf.ease.shape == (n_items, n_items)
    assert cf.knn.nnz > 0 and cf.transitions.nnz > 0
    assert cf.knn.getnnz(axis=0).max() <= settings.collaborative.knn_neighbors
    final = result.metrics[FINAL_SYSTEM]
    assert 0.0 < final["ndcg@10"] <= 1.0
