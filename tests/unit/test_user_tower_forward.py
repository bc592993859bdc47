"""The user tower in numpy (`user_tower.npz`) computes what training's torch tower computes, serving
a bundle imports no torch (Feast included; nor XGBoost sklearn), and a bundle without the npz is
refused (no TorchScript fallback).

The reference is the eager `training.two_tower.UserTower` that was exported, and the same module read
back by `read_user_tower`, run by torch: the independent path the numpy forward must reproduce.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from serve_app.bundle import load_user_tower_weights, read_manifest
from serve_app.contract import ITEM_FEATURE_NAMES, RANKER_FEATURE_NAMES
from serve_app.errors import BundleIntegrityError
from serve_app.schemas import USER_TOWER_WEIGHTS_FILE, BundleManifest, IndexSpec
from serve_app.stages.user_tower import NumpyUserTower, TowerModel
from tests.fresh_interpreter import run_probe
from training.registry import sha256_file, write_manifest
from training.two_tower import UserTower, export_user_tower, read_user_tower

BUCKETS, N_ITEMS, HIDDEN, DIM, HISTORY = 16, 30, 12, 6, 5
CATEGORIES = ("a", "b", "c")
PROFILE_DIM = 1 + len(CATEGORIES)


def write_tower_bundle(directory: Path, *, seed: int = 0, with_weights: bool = True) -> UserTower:
    """The user tower's part of a bundle: an untrained tower exported as training exports it, the
    item ids, and a manifest listing those files (the other stages' files are not needed here).
    Returns the exported module."""
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tower = UserTower(BUCKETS, N_ITEMS, PROFILE_DIM, HIDDEN, DIM).eval()
    export_user_tower(tower, directory)
    if not with_weights:  # a bundle from before the npz (its tower only as TorchScript)
        (directory / USER_TOWER_WEIGHTS_FILE).unlink()
        (directory / "user_tower.pt").write_bytes(b"torchscript")
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
    return tower


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


def torch_forward(
    tower: UserTower, buckets: np.ndarray, profile: np.ndarray, recent: np.ndarray
) -> np.ndarray:
    with torch.inference_mode():
        out = tower(torch.from_numpy(buckets), torch.from_numpy(profile), torch.from_numpy(recent))
    return np.asarray(out.numpy(), dtype=np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpy_forward_equals_the_torch_forward(tmp_path: Path, seed: int) -> None:
    exported = write_tower_bundle(tmp_path, seed=seed)
    manifest = read_manifest(tmp_path)
    numpy_tower = NumpyUserTower.from_weights(load_user_tower_weights(tmp_path, manifest))

    buckets, profile, recent = tower_batch(np.random.default_rng(seed), 64)
    got = numpy_tower(buckets, profile, recent)
    expected = torch_forward(exported, buckets, profile, recent)
    # Read back for offline scoring, the module is the one exported.
    np.testing.assert_array_equal(
        torch_forward(read_user_tower(tmp_path), buckets, profile, recent), expected
    )

    assert got.dtype == np.float32 and got.shape == (64, DIM)
    assert float(np.abs(got - expected).max()) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # The edge rows differ from each other: the mask and the bucket really enter the output.
    assert float(np.abs(got[0] - got[1]).max()) > 1e-3


def test_tower_model_serves_the_npz_memory_mapped_and_refuses_a_bundle_without_it(
    tmp_path: Path,
) -> None:
    write_tower_bundle(tmp_path / "new")
    write_tower_bundle(tmp_path / "old", with_weights=False)
    new = TowerModel.from_directory(tmp_path / "new", "2", read_manifest(tmp_path / "new"))
    assert isinstance(new.tower, NumpyUserTower)
    # The history table is a read-only map of the file, not a copy in this process.
    table = new.tower.history_embedding
    assert not table.flags.owndata and not table.flags.writeable
    with pytest.raises(BundleIntegrityError, match=r"user tower from user_tower\.npz only") as exc:
        TowerModel.from_directory(tmp_path / "old", "1")
    assert exc.value.file == USER_TOWER_WEIGHTS_FILE


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
from serve_app.stages.user_tower import TowerModel
directory = Path(sys.argv[1])
model = TowerModel.from_directory(directory, "1", read_manifest(directory))
model.warm()
if len(sys.argv) > 2:  # the probe's own check: a module imported after the load is seen
    import torch
print(json.dumps({name: name in sys.modules for name in ("torch", "feast", "sklearn")}))
"""


def imports_of_a_tower_replica(bundle: Path, *extra: str) -> dict[str, bool]:
    """Load and warm the bundle's tower in a fresh interpreter after importing the four stage
    deployments, Feast and XGBoost as serving does; which of torch, Feast and sklearn it holds."""
    result: dict[str, bool] = run_probe(PROBE, str(bundle), *extra)
    return result


@pytest.mark.slow
def test_serving_stages_feast_and_xgboost_import_no_torch(tmp_path: Path) -> None:
    write_tower_bundle(tmp_path)
    assert imports_of_a_tower_replica(tmp_path) == {"torch": False, "feast": True, "sklearn": False}
    # The probe does see torch when something imports it.
    assert imports_of_a_tower_replica(tmp_path, "import-torch")["torch"] is True
