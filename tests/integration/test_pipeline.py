"""The whole offline pipeline on tiny generated data against a real MLflow registry: the rounds, the
settings search (Optuna, nested MLflow runs), pinned settings, the refit bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from serve_app.bundle import fetch_bundle, load_bundle, resolve_alias
from serve_app.contract import RANKER_FEATURE_NAMES, RANKER_FEATURE_NAMES_CF, is_known_user
from serve_app.event_writer import load_known_users
from serve_app.schemas import BUNDLE_FILES
from training.config import SIZES, TrainingSettings, load_settings
from training.data import Dataset
from training.pipeline import FINAL_SYSTEM, run_pipeline
from training.registry import promote
from training.rounds import basket_round, temporal_rounds
from training.synthetic import generate
from training.two_tower import read_user_tower

pytestmark = pytest.mark.integration

NEW_ITEM = "i-new"


def tiny_settings(
    data_dir: Path, budget: float = 0.0, max_trials: int = 40, **overrides: object
) -> TrainingSettings:
    search = {"budget_seconds": budget, "max_trials": max_trials}
    settings = load_settings(data_dir=data_dir, search=search, **overrides)
    settings.synthetic = settings.synthetic.model_copy(update=SIZES["tiny"])
    settings.two_tower = settings.two_tower.model_copy(update={"epochs": 3, "batch_size": 256})
    settings.ranker = settings.ranker.model_copy(update={"candidates": 50, "max_rounds": 50})
    return settings


def with_new_item(dataset: Dataset, buyers: int = 12) -> Dataset:
    """A catalog item nobody saw until the very end: the last purchase of `buyers` active users."""
    events, catalog = dataset.events, dataset.catalog
    active = events.loc[events["event_type"] == "purchase", "user_id"].value_counts()
    end = events["timestamp"].max()
    rows = pd.DataFrame(
        {
            "user_id": active.index[:buyers],
            "item_id": NEW_ITEM,
            "event_type": "purchase",
            "timestamp": [end + pd.Timedelta(minutes=1 + i) for i in range(buyers)],
            "position": -1,
            "session_id": "",
            "weight": 3.0,
        }
    )
    item = catalog.iloc[[0]].assign(item_id=NEW_ITEM, created_at=end)
    return Dataset(
        dataset.name,
        pd.concat([events, rows[events.columns]], ignore_index=True),
        pd.concat([catalog, item], ignore_index=True),
    )


def test_pipeline_registers_a_verified_refit_bundle_that_round_trips(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path / "data")
    dataset = with_new_item(generate(settings.synthetic, progress=False))
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
    # The figures are the test round's, scored through serving; the bundle is the refit.
    assert manifest.metrics["ndcg@10"] == pytest.approx(result.metrics[FINAL_SYSTEM]["ndcg@10"])
    assert manifest.params["refit"] is True and manifest.params["search.trials"] == 0
    metrics_file = json.loads((result.bundle_dir.parent / "metrics.json").read_text())
    assert set(metrics_file) >= {"popularity", "item-kNN", "EASE", "retrieval", FINAL_SYSTEM}
    users = len(temporal_rounds(dataset.events)[1].user_ids)
    assert result.metrics[FINAL_SYSTEM]["users"] == users == manifest.params["rounds.test_users"]
    # The within-order table (the generator's sessions are user-days): every system on the users
    # whose first held-out order has two new items or more, the figures in the manifest.
    basket_users = len(basket_round(dataset.events).user_ids)
    assert basket_users == manifest.params["rounds.basket_test_users"] > 0
    assert set(result.basket_metrics) == set(result.metrics)
    assert result.basket_metrics[FINAL_SYSTEM]["users"] == basket_users
    assert manifest.metrics["basket/recserve/ndcg@10"] == pytest.approx(
        result.basket_metrics[FINAL_SYSTEM]["ndcg@10"]
    )
    assert (
        result.basket_metrics[FINAL_SYSTEM]["ndcg@10"]
        > result.basket_metrics["popularity"]["ndcg@10"]
    )

    # The users it was trained on, for the event writer's cold-user expiry: all of them, only them.
    known = load_known_users(path, manifest.files)
    assert known is not None and len(known) == manifest.params["users"]
    assert is_known_user(known, str(dataset.events["user_id"].iloc[0]))
    assert not is_known_user(known, "never-seen-in-training")
    # The downloaded artifacts are the ones the pipeline wrote.
    np.testing.assert_array_equal(
        bundle.item_embeddings, np.load(result.bundle_dir / "item_embeddings.npy")
    )
    # Every item is its own nearest neighbour in the shipped index.
    _, ids = bundle.index.search(np.ascontiguousarray(bundle.item_embeddings[:20]), 1)
    assert ids[:, 0].tolist() == list(range(20))
    # The tower ships once (npz, no TorchScript copy), runs on the manifest's declared inputs and
    # returns unit vectors.
    assert "user_tower.npz" in manifest.files and "user_tower.pt" not in manifest.files
    spec = manifest.user_tower
    out = read_user_tower(path)(
        torch.tensor([0, 1]),
        torch.zeros(2, spec["profile_dim"]),
        torch.tensor([[1] + [0] * (spec["history_length"] - 1)] * 2),
    )
    assert out.shape == (2, manifest.embedding_dim)
    np.testing.assert_allclose(out.norm(dim=1).detach().numpy(), 1.0, rtol=1e-5)
    # Collaborative models are on by default; the ranker accepts the manifest's feature list.
    assert tuple(manifest.ranker_features) == RANKER_FEATURE_NAMES_CF
    x = np.zeros((3, len(manifest.ranker_features)), dtype=np.float32)
    assert bundle.ranker.inplace_predict(x).shape == (3,)
    assert bundle.collaborative is not None and "collaborative.npz" in manifest.files
    assert bundle.collaborative.ease.nnz > 0 and bundle.collaborative.transitions.nnz > 0
    assert bundle.collaborative.basket is not None and bundle.collaborative.basket.nnz > 0
    # Feature tables for Feast were written next to the data.
    assert result.feature_tables["user_profile"].exists()

    # The refit knows the item first bought after both cutoffs (every purchase of it is held out
    # of the test round): popularity, EASE and kNN rows; the test round's bundle does not.
    row = int(np.flatnonzero(bundle.item_ids == NEW_ITEM)[0])
    test_round = load_bundle(result.bundle_dir.parent / "test_round_bundle")
    pop = manifest.item_feature_names.index("log_pop_all")
    assert bundle.item_features[row, pop] > 0 == test_round.item_features[row, pop]
    assert bundle.collaborative.knn[row].nnz > 0 and bundle.collaborative.ease[:, row].nnz > 0
    assert test_round.collaborative is not None and test_round.collaborative.knn[row].nnz == 0
    popular = json.loads((result.bundle_dir / "popularity.json").read_text())["global"]
    assert NEW_ITEM in popular[:20]  # bought by 12 users in the last minutes: recent popularity

    # A second run is version 2; promotion to champion is gated on NDCG@10.
    second = run_pipeline(settings, dataset, progress=False)
    assert second.registered is not None and second.registered.version == "2"
    decision = promote(tracking_uri=settings.tracking_uri, model_name=settings.model_name)
    assert decision.promoted and decision.to_version == "2"


def test_search_runs_trials_as_nested_mlflow_runs_and_leaves_a_pinned_setting_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSERVE_RANKER__MAX_DEPTH", "3")  # pinned by the environment
    settings = tiny_settings(tmp_path / "data", budget=15.0, max_trials=3, register_bundle=False)
    result = run_pipeline(settings, generate(settings.synthetic, progress=False), progress=False)

    search = result.search
    assert search is not None and 1 <= len(search.trials) <= 3
    assert "ranker.max_depth" in search.pinned and "ranker.max_depth" not in search.searched
    assert "ranker.max_depth" not in search.chosen and len(search.chosen) == len(search.searched)
    manifest = load_bundle(result.bundle_dir).manifest
    assert manifest.params["ranker.max_depth"] == 3
    assert "ranker.max_depth" in manifest.params["search.pinned"]
    assert manifest.params["search.trials"] == len(search.trials)
    # The chosen values are what the bundle was fit with (the manifest's params).
    for name, value in search.chosen.items():
        assert manifest.params[name] == value, name
    # Trial 0 is the settings as given; the chosen trial is the best on validation.
    assert search.best_ndcg10 >= search.given_ndcg10 > 0
    assert manifest.metrics["validation/ndcg@10"] == pytest.approx(search.best_ndcg10)
    # The objective is the mean of the time-cutoff and within-order rounds' NDCG@10.
    assert set(search.best_by_round) == {"time", "basket"}
    assert search.best_ndcg10 == pytest.approx(np.mean(list(search.best_by_round.values())))
    assert manifest.metrics["validation/basket/ndcg@10"] == search.best_by_round["basket"]

    # One nested MLflow run per trial under one parent run.
    client = MlflowClient(settings.tracking_uri)  # not mlflow.set_tracking_uri: a process global
    experiment = client.get_experiment_by_name("recserve-search")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == len(search.trials)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert "ranker.max_depth" not in children[0].data.params


def test_pipeline_with_window_labels_and_no_collaborative_models(tmp_path: Path) -> None:
    settings = tiny_settings(
        tmp_path / "data",
        register_bundle=False,
        collaborative={"enabled": False},
        split={"ranker_labels": "window"},
    )
    result = run_pipeline(settings, generate(settings.synthetic, progress=False), progress=False)

    bundle = load_bundle(result.bundle_dir)
    assert tuple(bundle.manifest.ranker_features) == RANKER_FEATURE_NAMES
    assert bundle.collaborative is None and "collaborative.npz" not in bundle.manifest.files
    assert bundle.manifest.params["split.ranker_labels"] == "window"
    final, retrieval = result.metrics[FINAL_SYSTEM], result.metrics["retrieval"]
    assert 0.0 < final["ndcg@10"] <= 1.0 and final["users"] == retrieval["users"]
