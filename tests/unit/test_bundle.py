"""Bundle format round trip, and every way verification must refuse a bundle (no registry)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from serve_app.bundle import check_manifest_digest, load_bundle, verify_bundle
from serve_app.contract import CF_SIGNALS, Collaborative, cf_scores
from serve_app.errors import BundleIntegrityError
from serve_app.schemas import BUNDLE_FILES
from serve_app.stages.user_tower import NumpyUserTower
from tests.bundle_factory import (
    HISTORY_LENGTH,
    NUM_BUCKETS,
    PROFILE_DIM,
    build_tiny_tower,
    make_tiny_bundle,
    rewrite_consistently,
    tiny_arrays,
    train_tiny_ranker,
)
from training.collaborative import fit_collaborative, save_collaborative
from training.config import CollaborativeConfig
from training.features import EncodedLog
from training.registry import (
    RegistryError,
    check_bundle,
    finalize_bundle,
    read_manifest,
    write_manifest,
)

N_ITEMS, DIM, SEED = 30, 8, 7


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "bundle"
    make_tiny_bundle(directory, n_items=N_ITEMS, dim=DIM, seed=SEED)
    return directory


def test_finalize_lists_sha256_of_every_file_but_the_manifest(bundle_dir: Path) -> None:
    manifest = read_manifest(bundle_dir)
    expected = {
        name: hashlib.sha256((bundle_dir / name).read_bytes()).hexdigest() for name in BUNDLE_FILES
    }
    assert manifest.files == expected
    assert "manifest.json" not in manifest.files


def test_round_trip_gives_identical_arrays_and_same_tower_output(bundle_dir: Path) -> None:
    expected = tiny_arrays(N_ITEMS, DIM, SEED)
    bundle = load_bundle(bundle_dir)

    assert bundle.manifest.num_items == N_ITEMS and bundle.manifest.embedding_dim == DIM
    np.testing.assert_array_equal(bundle.item_ids, expected.item_ids)
    np.testing.assert_array_equal(bundle.item_embeddings, expected.item_embeddings)
    np.testing.assert_array_equal(bundle.item_features, expected.item_features)
    np.testing.assert_array_equal(bundle.item_categories, expected.item_categories)
    assert bundle.item_embeddings.dtype == np.float32 and bundle.item_categories.dtype == np.int32
    assert bundle.item_index["item_0000"] == 0 and bundle.item_index[f"item_{N_ITEMS - 1:04d}"] == (
        N_ITEMS - 1
    )
    assert not bundle.item_embeddings.flags.writeable

    # The saved and reloaded weights, run in numpy, compute what the eager torch module computes.
    eager = build_tiny_tower(N_ITEMS, DIM, SEED)
    gen = torch.Generator().manual_seed(1)
    user_bucket = torch.randint(0, NUM_BUCKETS + 1, (4,), generator=gen)
    profile = torch.randn(4, PROFILE_DIM, generator=gen)
    recent = torch.tensor([[1, 3, 0, 0, 0], [5, 6, 7, 8, 9], [0] * HISTORY_LENGTH, [N_ITEMS] * 5])
    loaded_out = NumpyUserTower.from_weights(bundle.user_tower_weights)(
        user_bucket.numpy(), profile.numpy(), recent.numpy()
    )
    with torch.inference_mode():
        eager_out = eager(user_bucket, profile, recent).numpy()
    assert loaded_out.shape == (4, DIM)
    np.testing.assert_allclose(loaded_out, eager_out, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(loaded_out, axis=1), 1.0, atol=1e-6)

    # Inner-product search over unit vectors: every item is its own nearest neighbour.
    _, neighbours = bundle.index.search(expected.item_embeddings[[0, 11, 29]], 1)
    assert neighbours[:, 0].tolist() == [0, 11, 29]

    # The reloaded ranker scores like the booster the factory trained (same seed, nthread=1).
    rows = np.random.default_rng(3).uniform(size=(6, 5)).astype(np.float32)
    np.testing.assert_allclose(
        bundle.ranker.inplace_predict(rows),
        train_tiny_ranker(SEED).inplace_predict(rows),
        rtol=1e-6,
    )

    # Popularity: the item with the highest popularity feature (column 1) comes first.
    top = expected.item_ids[int(np.argmax(expected.item_features[:, 1]))]
    assert bundle.popularity["global"][0] == top
    assert sorted(bundle.popularity["by_category"]) == ["books", "games", "music"]


def test_one_changed_byte_is_a_checksum_mismatch_naming_the_file(bundle_dir: Path) -> None:
    path = bundle_dir / "item_embeddings.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # last byte of the last float: still a perfectly loadable array
    path.write_bytes(bytes(data))

    with pytest.raises(BundleIntegrityError, match="checksum mismatch") as excinfo:
        verify_bundle(bundle_dir)
    assert excinfo.value.file == "item_embeddings.npy"
    assert "item_embeddings.npy" in str(excinfo.value)
    with pytest.raises(BundleIntegrityError):
        load_bundle(bundle_dir)


def test_missing_file_is_refused_naming_it(bundle_dir: Path) -> None:
    (bundle_dir / "ranker.ubj").unlink()
    with pytest.raises(BundleIntegrityError, match=r"ranker\.ubj: missing") as excinfo:
        verify_bundle(bundle_dir)
    assert excinfo.value.file == "ranker.ubj"


def test_the_user_tower_ships_once_as_npz(bundle_dir: Path) -> None:
    manifest = read_manifest(bundle_dir)
    assert manifest.format_version == 2
    assert "user_tower.npz" in manifest.files and "user_tower.pt" not in manifest.files
    assert not (bundle_dir / "user_tower.pt").exists()
    # The writer refuses the retired TorchScript copy of the tower.
    (bundle_dir / "user_tower.pt").write_bytes(b"torchscript")
    with pytest.raises(RegistryError, match=r"'user_tower\.pt' is not part of bundle format 2"):
        finalize_bundle(bundle_dir, manifest)


def test_a_bundle_without_the_npz_tower_is_refused_naming_it(bundle_dir: Path) -> None:
    # A format 1 bundle that carries its tower only as TorchScript: no torch fallback any more.
    manifest = read_manifest(bundle_dir)
    (bundle_dir / "user_tower.npz").unlink()
    (bundle_dir / "user_tower.pt").write_bytes(b"torchscript")
    files = {k: v for k, v in manifest.files.items() if k != "user_tower.npz"}
    files["user_tower.pt"] = hashlib.sha256(b"torchscript").hexdigest()
    write_manifest(bundle_dir, manifest.model_copy(update={"files": files, "format_version": 1}))
    with pytest.raises(
        BundleIntegrityError, match=r"runs the user tower from user_tower\.npz only"
    ):
        verify_bundle(bundle_dir)


def test_a_format_1_bundle_with_the_npz_tower_still_loads(bundle_dir: Path) -> None:
    manifest = read_manifest(bundle_dir)
    (bundle_dir / "user_tower.pt").write_bytes(b"never opened")
    files = {**manifest.files, "user_tower.pt": hashlib.sha256(b"never opened").hexdigest()}
    write_manifest(bundle_dir, manifest.model_copy(update={"files": files, "format_version": 1}))
    bundle = load_bundle(bundle_dir)
    assert bundle.manifest.format_version == 1
    assert bundle.item_index["item_0003"] == 3


def test_unknown_format_version_is_refused(bundle_dir: Path) -> None:
    manifest_path = bundle_dir / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    raw["format_version"] = 99
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(BundleIntegrityError, match="format_version 99") as excinfo:
        verify_bundle(bundle_dir)
    assert excinfo.value.file == "manifest.json"


def test_unreadable_manifest_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / "manifest.json").write_text("{not json")
    with pytest.raises(BundleIntegrityError, match=r"manifest\.json: unreadable"):
        verify_bundle(bundle_dir)


def test_manifest_file_name_outside_the_bundle_is_refused(bundle_dir: Path) -> None:
    manifest_path = bundle_dir / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    raw["files"]["../escape.npy"] = "0" * 64
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(BundleIntegrityError, match="unsafe file name") as excinfo:
        verify_bundle(bundle_dir)
    assert excinfo.value.file == "../escape.npy"


def test_unlisted_extra_file_is_ignored(bundle_dir: Path) -> None:
    (bundle_dir / "notes.txt").write_text("left by a copy tool")
    (bundle_dir / "user_tower.pt").write_text("a stray file the loader never opens")
    assert verify_bundle(bundle_dir).files.keys() == set(BUNDLE_FILES)


class _Trap:
    """Unpickling this object writes its marker file: proof that something unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_spring, (str(self.marker),))


def _spring(marker: str) -> None:
    Path(marker).write_text("unpickled")


def test_object_array_is_refused_without_unpickling(bundle_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "sprung"
    trap = np.empty(N_ITEMS, dtype=object)
    trap[:] = [_Trap(marker) for _ in range(N_ITEMS)]
    np.save(bundle_dir / "item_ids.npy", trap, allow_pickle=True)
    finalize_bundle(
        bundle_dir, read_manifest(bundle_dir)
    )  # checksums match: only the loader can say no

    verify_bundle(bundle_dir)
    with pytest.raises(BundleIntegrityError, match=r"item_ids\.npy") as excinfo:
        load_bundle(bundle_dir)
    assert excinfo.value.file == "item_ids.npy"
    assert not marker.exists()
    # The trap is live: loading with pickle allowed does spring it.
    np.load(bundle_dir / "item_ids.npy", allow_pickle=True)
    assert marker.read_text() == "unpickled"


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_an_object_array_in_the_tower_npz_is_refused_without_unpickling(
    bundle_dir: Path, tmp_path: Path, save: object
) -> None:
    # Stored members are mapped in place, compressed ones read through numpy: both refuse pickle.
    marker = tmp_path / "sprung"
    with np.load(bundle_dir / "user_tower.npz", allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["mlp.2.bias"] = np.array([_Trap(marker)], dtype=object)
    assert callable(save)
    save(bundle_dir / "user_tower.npz", **arrays)
    finalize_bundle(bundle_dir, read_manifest(bundle_dir))

    verify_bundle(bundle_dir)
    with pytest.raises(BundleIntegrityError, match=r"user_tower\.npz") as excinfo:
        load_bundle(bundle_dir)
    assert excinfo.value.file == "user_tower.npz"
    assert not marker.exists()
    with np.load(bundle_dir / "user_tower.npz", allow_pickle=True) as archive:
        archive["mlp.2.bias"]  # the trap is live: loading with pickle allowed springs it
    assert marker.read_text() == "unpickled"


def test_array_shape_disagreeing_with_manifest_is_refused(bundle_dir: Path) -> None:
    np.save(bundle_dir / "item_categories.npy", np.zeros(N_ITEMS - 1, dtype=np.int32))
    finalize_bundle(bundle_dir, read_manifest(bundle_dir))
    with pytest.raises(
        BundleIntegrityError, match=rf"shape \({N_ITEMS - 1},\), expected \({N_ITEMS},\)"
    ):
        load_bundle(bundle_dir)


def test_index_search_params_from_manifest_are_applied(bundle_dir: Path) -> None:
    hnsw = faiss.IndexHNSWFlat(DIM, 8, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(tiny_arrays(N_ITEMS, DIM, SEED).item_embeddings)
    faiss.write_index(hnsw, str(bundle_dir / "index.faiss"))
    manifest = read_manifest(bundle_dir)
    manifest = manifest.model_copy(
        update={
            "index": manifest.index.model_copy(
                update={"type": "hnsw", "params": {"M": 8, "efSearch": 77}}
            )
        }
    )
    finalize_bundle(bundle_dir, manifest)

    bundle = load_bundle(bundle_dir)
    index = faiss.downcast_index(bundle.index)
    assert isinstance(index, faiss.IndexHNSWFlat)
    assert index.hnsw.efSearch == 77


def test_a_manifest_matching_its_pinned_digest_passes(bundle_dir: Path) -> None:
    pinned = hashlib.sha256((bundle_dir / "manifest.json").read_bytes()).hexdigest()
    check_manifest_digest(bundle_dir, pinned, "3")
    check_manifest_digest(bundle_dir, pinned.upper(), "3")  # hex digits in either case


def test_files_and_manifest_rewritten_together_verify_but_miss_the_pinned_digest(
    bundle_dir: Path,
) -> None:
    pinned = hashlib.sha256((bundle_dir / "manifest.json").read_bytes()).hexdigest()
    rewrite_consistently(bundle_dir)
    verify_bundle(bundle_dir)  # the per-file checksums alone cannot tell
    with pytest.raises(BundleIntegrityError) as refused:
        check_manifest_digest(bundle_dir, pinned, "3")
    assert refused.value.file == "manifest.json"
    assert f"recserve.manifest_sha256 tag {pinned[:12]}" in refused.value.message
    assert "changed in the artifact store after registration" in refused.value.message


def test_an_untagged_version_is_refused_unless_allowed(bundle_dir: Path) -> None:
    with pytest.raises(BundleIntegrityError, match=r"version 3 has no recserve\.manifest_sha256"):
        check_manifest_digest(bundle_dir, None, "3")
    check_manifest_digest(bundle_dir, None, "3", allow_untagged=True)


def test_a_missing_manifest_is_refused_before_any_digest_is_compared(tmp_path: Path) -> None:
    with pytest.raises(BundleIntegrityError, match=r"manifest\.json: missing"):
        check_manifest_digest(tmp_path, "0" * 64, "3")


def test_registry_refuses_to_register_a_tampered_bundle(bundle_dir: Path) -> None:
    (bundle_dir / "popularity.json").write_text('{"global": []}')
    with pytest.raises(RegistryError, match=r"checksum mismatch for 'popularity\.json'"):
        check_bundle(bundle_dir)


def test_the_manifests_search_params_are_set_on_the_index() -> None:
    from serve_app.bundle import _apply_search_params

    vectors = np.random.default_rng(0).random((500, 8), dtype=np.float32)
    hnsw = faiss.IndexHNSWFlat(8, 8)
    hnsw.add(vectors)
    # training.index.index_params writes `ef_search`; FAISS calls it efSearch.
    _apply_search_params(hnsw, {"ef_search": 77, "m": 8})
    assert hnsw.hnsw.efSearch == 77
    flat = faiss.IndexFlatIP(8)
    with pytest.raises(BundleIntegrityError, match="ef_search"):
        _apply_search_params(flat, {"ef_search": 77})


def _with_collaborative(bundle_dir: Path) -> Collaborative:
    """Add real collaborative models (fit on a random log over the bundle's items) to the bundle."""
    rng = np.random.default_rng(SEED)
    users, items = rng.integers(0, 40, 400), rng.integers(0, N_ITEMS, 400)
    log = EncodedLog(
        user_ids=np.array([f"u{i}" for i in range(40)]),
        user=users,
        item=items,
        category=np.zeros(400, dtype=np.int64),
        ts=np.arange(400, dtype=np.int64) * 10**9,
        weight=np.ones(400, dtype=np.float32),
        positive=np.ones(400, dtype=bool),
        is_view=np.zeros(400, dtype=bool),
        n_items=N_ITEMS,
        n_categories=1,
        session=np.arange(400, dtype=np.int64) // 4,  # orders of four lines
    )
    model = fit_collaborative(log, None, CollaborativeConfig(ease_top_k=5, per_source=3))
    manifest = read_manifest(bundle_dir)
    spec = save_collaborative(model, bundle_dir)
    finalize_bundle(bundle_dir, manifest.model_copy(update={"collaborative": spec}))
    return model


def test_collaborative_models_round_trip_without_pickle(bundle_dir: Path) -> None:
    model = _with_collaborative(bundle_dir)
    loaded = load_bundle(bundle_dir).collaborative
    assert loaded is not None
    for name in ("ease", "knn", "transitions", "basket"):
        expected, got = getattr(model, name), getattr(loaded, name)
        assert got.nnz > 0 and (got != expected).nnz == 0
    assert model.ease.getnnz(axis=1).max() <= 5  # the top-k cut
    assert (loaded.last_items, loaded.per_source) == (model.last_items, 3)
    assert loaded.basket_items == model.basket_items


def test_a_bundle_from_before_the_basket_signal_loads_and_scores_nothing_with_it(
    bundle_dir: Path,
) -> None:
    _with_collaborative(bundle_dir)
    with np.load(bundle_dir / "collaborative.npz") as npz:
        arrays = {key: npz[key] for key in npz.files if not key.startswith("basket_")}
    with (bundle_dir / "collaborative.npz").open("wb") as out:
        np.savez(out, **arrays)
    manifest = read_manifest(bundle_dir)
    spec = {k: v for k, v in manifest.collaborative.items() if k != "basket_items"}
    finalize_bundle(bundle_dir, manifest.model_copy(update={"collaborative": spec}))
    loaded = load_bundle(bundle_dir).collaborative
    assert loaded is not None and loaded.basket is not None and loaded.basket.nnz == 0
    scores = cf_scores(loaded, np.array([0, 1, 2]), np.array([1, 2, 3, 0]))
    basket = CF_SIGNALS.index("basket")
    assert len(scores.rows[basket]) == 0 and len(scores.rows[0]) > 0


def test_collaborative_matrix_pointing_outside_the_catalog_is_refused(bundle_dir: Path) -> None:
    _with_collaborative(bundle_dir)
    with np.load(bundle_dir / "collaborative.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["knn_indices"] = arrays["knn_indices"].copy()
    arrays["knn_indices"][0] = N_ITEMS  # one past the last item
    with (bundle_dir / "collaborative.npz").open("wb") as out:
        np.savez(out, **arrays)
    finalize_bundle(bundle_dir, read_manifest(bundle_dir))
    with pytest.raises(BundleIntegrityError, match="knn is not a valid") as excinfo:
        load_bundle(bundle_dir)
    assert excinfo.value.file == "collaborative.npz"


def test_collaborative_file_missing_from_the_checksums_is_refused(bundle_dir: Path) -> None:
    _with_collaborative(bundle_dir)
    manifest = read_manifest(bundle_dir)
    files = {k: v for k, v in manifest.files.items() if k != "collaborative.npz"}
    write_manifest(bundle_dir, manifest.model_copy(update={"files": files}))
    with pytest.raises(BundleIntegrityError, match="not listed"):
        load_bundle(bundle_dir)


def test_the_serving_hint_names_only_versions_this_node_has_cached(tmp_path: Path) -> None:
    from serve_app.bundle import SERVING_HINT, cached_bundle, read_serving_hint, write_serving_hint
    from serve_app.errors import ModelUnavailable

    cache = tmp_path / "cache"
    assert read_serving_hint("m", cache) == []  # no hint yet: a first start loads nothing
    for version in ("3", "4"):
        make_tiny_bundle(cache / "m" / version, n_items=10, dim=4, seed=int(version))
    write_serving_hint("m", {"4", "3", "7"}, cache)  # 7: served, but not on this node

    assert read_serving_hint("m", cache) == ["3", "4"]
    # Verification is the load's (cached_bundle, once): a copy that fails it is removed there,
    # and the hint no longer names it.
    (cache / "m" / "4" / "item_ids.npy").write_bytes(b"garbage")
    assert cached_bundle("m", "4", cache) is None
    assert not (cache / "m" / "4").exists()
    assert read_serving_hint("m", cache) == ["3"]

    (cache / "m" / SERVING_HINT).write_text('{"versions": ["../../etc", 3, "3"]}')
    assert read_serving_hint("m", cache) == ["3"]  # unsafe names and non-strings skipped
    (cache / "m" / SERVING_HINT).write_text("{not json")
    assert read_serving_hint("m", cache) == []
    with pytest.raises(ModelUnavailable, match="unsafe"):
        write_serving_hint("m", ["../x"], cache)
