"""The whole offline pipeline on tiny generated data against a real MLflow registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from serve_app.bundle import fetch_bundle, load_bundle, resolve_alias
from serve_app.contract import RANKER_FEATURE_NAMES, RANKER_FEATURE_NAMES_CF
from serve_app.schemas import BUNDLE_FILES
from training.cli import SIZES
from training.config import TrainingSettings, load_settings
from training.pipeline import FINAL_SYSTEM, run_pipeline
from training.registry import promote
from training.synthetic import generate

pytestmark = pytest.mark.integration


def tiny_settings(data_dir: Path) -> TrainingSettings:
    settings = load_settings(data_dir=data_dir)
    settings.synthetic = settings.synthetic.model_copy(update=SIZES["tiny"])
    settings.two_tower = settings.two_tower.model_copy(update={"epochs": 3, "batch_size": 256})
    settings.ranker = settings.ranker.model_copy(update={"candidates": 50, "max_rounds": 50})
    return settings


def test_pipeline_registers_a_verified_bundle_that_round_trips(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path / "data")
    settings.collaborative = settings.collaborative.model_copy(update={"enabled": True})
    dataset = generate(settings.synthetic, progress=False)
    result = run_pipeline(settings, dataset, progress=False)

    # Registered as version 1 with alias challenger, and the manifest knows its version.
    assert result.registered is not None and result.registered.version == "1"
    assert resolve_alias(settings.tracking_uri, settings.model_name, "challenger") == "1"
    path = fetch_bundle(settings.tracking_uri, settings.model_name, "1", tmp_path / "cache")
    bundle = load_bundle(path)
    manifest = bundle.manifest
    assert manifest.model_version == "1"
    assert set(BUNDLE_FILES) <= set(manifest.files)
    assert manifest.num_items == len(dataset.catalog) == len(bundle.item_ids)
    assert manifest.metrics["ndcg@10"] == pytest.approx(result.metrics[FINAL_SYSTEM]["ndcg@10"])
    metrics_file = json.loads((result.bundle_dir.parent / "metrics.json").read_text())
    assert set(metrics_file) >= {"popularity", "retrieval", FINAL_SYSTEM}

    # The downloaded artifacts are the ones the pipeline wrote.
    np.testing.assert_array_equal(
        bundle.item_embeddings, np.load(result.bundle_dir / "item_embeddings.npy")
    )
    # Every item is its own nearest neighbour in the shipped index.
    _, ids = bundle.index.search(np.ascontiguousarray(bundle.item_embeddings[:20]), 1)
    assert ids[:, 0].tolist() == list(range(20))
    # The TorchScript tower runs on the manifest's declared inputs and returns unit vectors.
    spec = manifest.user_tower
    out = bundle.user_tower(
        torch.tensor([0, 1]),
        torch.zeros(2, spec["profile_dim"]),
        torch.tensor([[1] + [0] * (spec["history_length"] - 1)] * 2),
    )
    assert out.shape == (2, manifest.embedding_dim)
    np.testing.assert_allclose(out.norm(dim=1).detach().numpy(), 1.0, rtol=1e-5)
    # The ranker accepts the manifest's feature list, collaborative signals included.
    assert tuple(manifest.ranker_features) == RANKER_FEATURE_NAMES_CF
    x = np.zeros((3, len(manifest.ranker_features)), dtype=np.float32)
    assert bundle.ranker.inplace_predict(x).shape == (3,)
    assert bundle.collaborative is not None and "collaborative.npz" in manifest.files
    assert bundle.collaborative.ease.nnz > 0 and bundle.collaborative.transitions.nnz > 0
    # Feature tables for Feast were written next to the data.
    assert result.feature_tables["user_profile"].exists()

    # A second run is version 2; promotion to champion is gated on NDCG@10.
    second = run_pipeline(settings, dataset, progress=False)
    assert second.registered is not None and second.registered.version == "2"
    decision = promote(tracking_uri=settings.tracking_uri, model_name=settings.model_name)
    assert decision.promoted and decision.to_version == "2"


def test_pipeline_with_tail_labels_and_no_collaborative_models(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path / "data")
    settings.register_bundle = False
    settings.collaborative = settings.collaborative.model_copy(update={"enabled": False})
    settings.split = settings.split.model_copy(update={"ranker_labels": "tail"})
    result = run_pipeline(settings, generate(settings.synthetic, progress=False), progress=False)

    bundle = load_bundle(result.bundle_dir)
    assert tuple(bundle.manifest.ranker_features) == RANKER_FEATURE_NAMES
    assert bundle.collaborative is None and "collaborative.npz" not in bundle.manifest.files
    assert bundle.manifest.params["split.ranker_labels"] == "tail"
    final, retrieval = result.metrics[FINAL_SYSTEM], result.metrics["retrieval"]
    assert 0.0 < final["ndcg@10"] <= 1.0 and final["users"] == retrieval["users"]
