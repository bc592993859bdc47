"""The user tower in numpy (`user_tower.npz`) computes what the TorchScript tower training exported
computes, and serving a bundle that has it imports no torch (Feast included; nor XGBoost sklearn).

The reference is the TorchScript file of the same tower (`training.two_tower.export_user_tower`
writes both), run by torch: the independent path the numpy forward must reproduce.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from serve_app.bundle import load_user_tower, load_user_tower_weights, read_manifest
from serve_app.contract import ITEM_FEATURE_NAMES, RANKER_FEATURE_NAMES
from serve_app.errors import BundleIntegrityError
from serve_app.schemas import USER_TOWER_WEIGHTS_FILE, BundleManifest, IndexSpec
from serve_app.stages.user_tower import NumpyUserTower, TorchScriptUserTower, TowerModel
from tests.fresh_interpreter import run_probe
from training.registry import sha256_file, write_manifest
from training.two_tower import UserTower, export_user_tower

BUCKETS, N_ITEMS, HIDDEN, DIM, HISTORY = 16, 30, 12, 6, 5
CATEGORIES = ("a", "b", "c")
PROFILE_DIM = 1 + len(CATEGORIES)


def write_tower_bundle(directory: Path, *, seed: int = 0, with_weights: bool = True) -> None:
    """The user tower's part of a bundle: an untrained tower exported as training exports it, the
    item ids, and a manifest listing those files (the other stages' files are not needed here)."""
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tower = UserTower(BUCKETS, N_ITEMS, PROFILE_DIM, HIDDEN, DIM)
    export_user_tower(tower, directory)
    if not with_weights:  # a bundle from before the npz
        (directory / USER_TOWER_WEIGHTS_FILE).unlink()
    item_ids = np.array([f"i{i:02d}" for i in range(N_ITEMS)])
    np.save(directory / "item_ids.npy", item_ids, allow_pickle=False)
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}
    manifest = BundleManifest(
        model_name="recserve",
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
        data_snapshot_id="unit",
        embedding_dim=DIM,
        num_items=N_ITEMS,
        user_tower={"user_buckets": BUCKETS, "history_length": HISTORY, "profile_dim": PROFILE_DIM},
        user_tower_inputs=[],
        ranker_features=list(RANKER_FEATURE_NAMES),
        item_feature_names=list(ITEM_FEATURE_NAMES),
        categories=list(CATEGORIES),
        index=IndexSpec(type="flat"),
        files=files,
    )
    write_manifest(directory, manifest)


def tower_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs as `tower_inputs`/`encode_recent` build them, with the edge rows in front: unknown
    user (bucket 0) with empty history, the last bucket, a full history, one item, repeated items."""
    buckets = rng.integers(0, BUCKETS + 1, n).astype(np.int64)
    buckets[:2] = [0, BUCKETS]
    profile = rng.normal(size=(n, PROFILE_DIM)).astype(np.float32)
    profile[0] = 0.0
    recent = np.zeros((n, HISTORY), dtype=np.int64)
    lengths = rng.integers(0, HISTORY + 1, n)
    lengths[:5] = [0, 0, HISTORY, 1, 3]
    for row, length in enumerate(lengths):
        recent[row, :length] = rng.integers(1, N_ITEMS + 1, length)
    recent[4, :3] = [N_ITEMS, N_ITEMS, 1]
    return buckets, profile, recent


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpy_forward_equals_the_torchscript_forward(tmp_path: Path, seed: int) -> None:
    write_tower_bundle(tmp_path, seed=seed)
    manifest = read_manifest(tmp_path)
    weights = load_user_tower_weights(tmp_path, manifest)
    assert weights is not None
    numpy_tower = NumpyUserTower.from_weights(weights)
    script_tower = TorchScriptUserTower(load_user_tower(tmp_path))

    buckets, profile, recent = tower_batch(np.random.default_rng(seed), 64)
    got = numpy_tower(buckets, profile, recent)
    expected = script_tower(buckets, profile, recent)

    assert got.dtype == np.float32 and got.shape == (64, DIM)
    assert float(np.abs(got - expected).max()) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # The edge rows differ from each other: the mask and the bucket really enter the output.
    assert float(np.abs(got[0] - got[1]).max()) > 1e-3


def test_tower_model_serves_numpy_when_the_bundle_has_the_weights(tmp_path: Path) -> None:
    write_tower_bundle(tmp_path / "new")
    write_tower_bundle(tmp_path / "old", with_weights=False)
    new = TowerModel.from_directory(tmp_path / "new", "2", read_manifest(tmp_path / "new"))
    old = TowerModel.from_directory(tmp_path / "old", "1", read_manifest(tmp_path / "old"))
    assert isinstance(new.tower, NumpyUserTower) and not new.runs_torch
    assert isinstance(old.tower, TorchScriptUserTower) and old.runs_torch
    batch = tower_batch(np.random.default_rng(5), 16)
    # The same tower exported twice: both bundles serve the same vectors.
    assert float(np.abs(new.tower(*batch) - old.tower(*batch)).max()) < 1e-5


def rewrite_weights(directory: Path, **changes: np.ndarray) -> None:
    """Replace arrays of the npz and re-list its checksum (a well-formed but wrong bundle)."""
    with np.load(directory / USER_TOWER_WEIGHTS_FILE) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays.update(changes)
    np.savez(directory / USER_TOWER_WEIGHTS_FILE, **arrays)  # type: ignore[arg-type]
    manifest = read_manifest(directory)
    files = {
        **manifest.files,
        USER_TOWER_WEIGHTS_FILE: sha256_file(directory / USER_TOWER_WEIGHTS_FILE),
    }
    write_manifest(directory, manifest.model_copy(update={"files": files}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mlp.2.bias": np.zeros(DIM + 1, np.float32)}, "mlp.2.bias is float32"),
        ({"user_embedding.weight": np.zeros((BUCKETS + 1, HIDDEN))}, "float64"),
        ({"history_embedding.weight": np.zeros((N_ITEMS, HIDDEN), np.float32)}, "expected"),
        ({"extra": np.zeros(1, np.float32)}, "arrays"),
        ({"mlp.0.bias": np.array([object()] * HIDDEN)}, "unreadable"),
    ],
)
def test_weights_of_the_wrong_shape_dtype_or_kind_are_refused(
    tmp_path: Path, changes: dict[str, np.ndarray], message: str
) -> None:
    write_tower_bundle(tmp_path)
    rewrite_weights(tmp_path, **changes)
    with pytest.raises(BundleIntegrityError, match=message) as excinfo:
        load_user_tower_weights(tmp_path, read_manifest(tmp_path))
    assert excinfo.value.file == USER_TOWER_WEIGHTS_FILE


PROBE = """
import json, sys
from pathlib import Path
import serve_app.deployments.ranker, serve_app.deployments.reranker, serve_app.deployments.retriever, serve_app.deployments.user_tower
from serve_app.imports import import_feast, import_xgboost
import_feast()
import feast, feature_repo.store  # what the UserTower reads features with
import_xgboost()  # as the Ranker loads its booster
from serve_app.bundle import read_manifest
from serve_app.deployments.user_tower import load_tower
directory = Path(sys.argv[1])
model = load_tower(directory, "1", read_manifest(directory))
model.warm()
print(json.dumps({name: name in sys.modules for name in ("torch", "feast", "sklearn")}))
"""


def imports_of_a_tower_replica(bundle: Path) -> dict[str, bool]:
    """Load and warm the bundle's tower in a fresh interpreter after importing the four stage
    deployments, Feast and XGBoost as serving does; which of torch, Feast and sklearn it holds."""
    result: dict[str, bool] = run_probe(PROBE, str(bundle))
    return result


@pytest.mark.slow
def test_serving_stages_feast_and_xgboost_import_no_torch_when_the_bundle_has_the_weights(
    tmp_path: Path,
) -> None:
    write_tower_bundle(tmp_path / "new")
    write_tower_bundle(tmp_path / "old", with_weights=False)
    new = imports_of_a_tower_replica(tmp_path / "new")
    assert new == {"torch": False, "feast": True, "sklearn": False}
    # The probe does see torch: a bundle with only the TorchScript tower imports it.
    assert imports_of_a_tower_replica(tmp_path / "old")["torch"] is True
