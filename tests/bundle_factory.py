"""Test helper: builds a tiny but real model bundle (the user tower's npz, FAISS index, XGBoost).

Shared by the bundle, registry and serving tests so they exercise the real file formats without a
training run. Keep `make_tiny_bundle`'s signature stable; the pieces are exposed so tests can
rebuild the same objects in memory and compare them with what a loader read back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import torch
import xgboost as xgb

from serve_app.schemas import BundleManifest, FeatureSpec, IndexSpec
from training.registry import finalize_bundle
from training.two_tower import UserTower, export_user_tower

NUM_BUCKETS = 64
CATEGORIES = ("books", "games", "music")
PROFILE_DIM = 1 + len(CATEGORIES)
HISTORY_LENGTH = 5
HIDDEN = 6
ITEM_FEATURE_NAMES = ("price", "popularity", "age_days")
RANKER_FEATURES = ("retrieval_score", "price", "popularity", "age_days", "category_affinity")
DEFAULT_METRICS = {"ndcg@10": 0.30, "recall@100": 0.50}


@dataclass(frozen=True)
class TinyArrays:
    item_ids: np.ndarray
    item_embeddings: np.ndarray
    item_features: np.ndarray
    item_categories: np.ndarray


def tiny_arrays(n_items: int = 50, dim: int = 8, seed: int = 0) -> TinyArrays:
    """The bundle's item arrays, a pure function of (n_items, dim, seed)."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n_items, dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    features = np.column_stack(
        [
            rng.uniform(1.0, 100.0, n_items),  # price
            rng.uniform(0.0, 1.0, n_items),  # popularity
            rng.integers(0, 365, n_items),  # age_days
        ]
    ).astype(np.float32)
    return TinyArrays(
        item_ids=np.array([f"item_{i:04d}" for i in range(n_items)]),
        item_embeddings=embeddings,
        item_features=features,
        item_categories=(np.arange(n_items) % len(CATEGORIES)).astype(np.int32),
    )


def build_tiny_tower(n_items: int, dim: int, seed: int = 0) -> UserTower:
    """The eager user tower (training's class, untrained), deterministic in `seed` without touching
    torch's global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tower = UserTower(NUM_BUCKETS, n_items, PROFILE_DIM, HIDDEN, dim)
    return tower.eval()


def train_tiny_ranker(seed: int = 0, rounds: int = 4) -> xgb.Booster:
    """A real `rank:ndcg` booster on random groups whose label follows the retrieval score."""
    rng = np.random.default_rng(seed + 1)
    groups, group_size = 20, 10
    x = rng.uniform(size=(groups * group_size, len(RANKER_FEATURES))).astype(np.float32)
    y = (x[:, 0] > 0.6).astype(np.float32) + (x[:, 4] > 0.8).astype(np.float32)
    matrix = xgb.DMatrix(x, label=y, feature_names=list(RANKER_FEATURES))
    matrix.set_group([group_size] * groups)
    params = {"objective": "rank:ndcg", "max_depth": 3, "eta": 0.3, "nthread": 1, "seed": seed}
    return xgb.train(params, matrix, num_boost_round=rounds)


def tiny_popularity(arrays: TinyArrays) -> dict[str, object]:
    """Most popular first, globally and per category (ties broken by id for determinism)."""
    scores = arrays.item_features[:, ITEM_FEATURE_NAMES.index("popularity")]
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), str(arrays.item_ids[i])))
    by_category = {
        name: [str(arrays.item_ids[i]) for i in order if arrays.item_categories[i] == code]
        for code, name in enumerate(CATEGORIES)
    }
    return {"global": [str(arrays.item_ids[i]) for i in order], "by_category": by_category}


def make_tiny_bundle(
    directory: str | Path,
    *,
    n_items: int = 50,
    dim: int = 8,
    seed: int = 0,
    metrics: Mapping[str, float] | None = None,
) -> BundleManifest:
    """Write a finalized bundle into `directory` (created if needed); return manifest."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    arrays = tiny_arrays(n_items, dim, seed)
    np.save(out / "item_ids.npy", arrays.item_ids, allow_pickle=False)
    np.save(out / "item_embeddings.npy", arrays.item_embeddings, allow_pickle=False)
    np.save(out / "item_features.npy", arrays.item_features, allow_pickle=False)
    np.save(out / "item_categories.npy", arrays.item_categories, allow_pickle=False)

    export_user_tower(build_tiny_tower(n_items, dim, seed), out)

    index = faiss.IndexFlatIP(dim)
    index.add(arrays.item_embeddings)
    faiss.write_index(index, str(out / "index.faiss"))

    train_tiny_ranker(seed).save_model(str(out / "ranker.ubj"))
    (out / "popularity.json").write_text(json.dumps(tiny_popularity(arrays), indent=2))

    manifest = BundleManifest(
        model_name="recserve",
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
        data_snapshot_id=f"tiny-seed{seed}",
        embedding_dim=dim,
        num_items=n_items,
        user_tower={
            "user_buckets": NUM_BUCKETS,
            "profile_dim": PROFILE_DIM,
            "history_length": HISTORY_LENGTH,
            "input_names": ["user_bucket", "profile", "recent"],
        },
        user_tower_inputs=[
            FeatureSpec(name="user_bucket", dtype="int64"),
            FeatureSpec(name="user_profile:profile", dtype="float32", shape=[PROFILE_DIM]),
            FeatureSpec(
                name="user_realtime:recent_item_ids", dtype="int64", shape=[HISTORY_LENGTH]
            ),
        ],
        ranker_features=list(RANKER_FEATURES),
        item_feature_names=list(ITEM_FEATURE_NAMES),
        categories=list(CATEGORIES),
        index=IndexSpec(type="flat", params={}),
        metrics=dict(DEFAULT_METRICS if metrics is None else metrics),
        params={"seed": seed, "factory": "tests.bundle_factory"},
        files={},
    )
    return finalize_bundle(out, manifest)


def tamper_registered(source_uri: str, name: str = "item_embeddings.npy") -> None:
    """Flip the last byte of one file of a registered version's stored artifacts (its checksum in
    the manifest no longer matches)."""
    stored = Path(source_uri.removeprefix("file://")) / name
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))


def rewrite_consistently(
    bundle_dir: str | Path, name: str = "ranker.ubj", content: bytes | None = None
) -> str:
    """What someone with write access to the artifact store can do: replace one file (`content`;
    None: append bytes to it) and put its new sha256 in the manifest, so that the bundle still
    verifies against its own manifest. Works on a local directory or a registered version's stored
    artifacts (its file:// `source_uri`). Returns the manifest's new sha256."""
    directory = Path(str(bundle_dir).removeprefix("file://"))
    if content is None:
        content = (directory / name).read_bytes() + b"tampered"
    (directory / name).write_bytes(content)
    manifest_path = directory / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    raw["files"][name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return hashlib.sha256(manifest_path.read_bytes()).hexdigest()


def make_serving_bundle(
    directory: str | Path,
    *,
    n_items: int = 50,
    dim: int = 8,
    hidden: int = HIDDEN,
    n_categories: int = len(CATEGORIES),
    seed: int = 0,
    popular: int = 1_000,
) -> BundleManifest:
    """A bundle the serving stages accept (the contract's item and ranker features, training's user
    tower), of any size, without training: random unit embeddings, an untrained tower, an exact
    index and a few-tree ranker on random rows. For tests of loading and for bench/replica_memory.py
    (a million items: ~1 GB on disk, about a minute to write)."""
    from serve_app.contract import ITEM_FEATURE_NAMES as ITEM_FEATURES
    from serve_app.contract import RANKER_FEATURE_NAMES

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    item_ids = np.array([f"i{i}" for i in rng.permutation(n_items)])  # rows not in id order
    np.save(out / "item_ids.npy", item_ids, allow_pickle=False)
    embeddings = np.empty((n_items, dim), dtype=np.float32)
    for start in range(0, n_items, 1 << 17):  # in chunks: no float64 copy of the whole table
        part = rng.standard_normal((min(1 << 17, n_items - start), dim), dtype=np.float32)
        embeddings[start : start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    np.save(out / "item_embeddings.npy", embeddings, allow_pickle=False)
    features = rng.uniform(0.0, 5.0, (n_items, len(ITEM_FEATURES))).astype(np.float32)
    np.save(out / "item_features.npy", features, allow_pickle=False)
    codes = rng.integers(0, n_categories, n_items).astype(np.int32)
    np.save(out / "item_categories.npy", codes, allow_pickle=False)
    index = faiss.IndexFlatIP(dim)
    index.add(embeddings)
    faiss.write_index(index, str(out / "index.faiss"))
    del index, embeddings
    categories = [f"c{c}" for c in range(n_categories)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tower = UserTower(NUM_BUCKETS, n_items, 1 + n_categories, hidden, dim).eval()
    export_user_tower(tower, out)
    del tower
    x = rng.uniform(size=(200, len(RANKER_FEATURE_NAMES))).astype(np.float32)
    train = xgb.DMatrix(x, label=(x[:, 0] > 0.5).astype(np.float32))
    train.set_group([10] * 20)
    params = {"objective": "rank:ndcg", "max_depth": 3, "nthread": 1, "seed": seed}
    xgb.train(params, train, num_boost_round=4).save_model(str(out / "ranker.ubj"))
    top = np.argsort(-features[:, 0], kind="stable")[:popular]
    popularity = {
        "global": item_ids[top].tolist(),
        "by_category": {categories[c]: item_ids[top[codes[top] == c]].tolist() for c in range(3)},
    }
    (out / "popularity.json").write_text(json.dumps(popularity))
    manifest = BundleManifest(
        model_name="recserve",
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
        data_snapshot_id=f"synthetic-{n_items}-seed{seed}",
        embedding_dim=dim,
        num_items=n_items,
        user_tower={
            "user_buckets": NUM_BUCKETS,
            "history_length": HISTORY_LENGTH,
            "profile_dim": 1 + n_categories,
        },
        user_tower_inputs=[],
        ranker_features=list(RANKER_FEATURE_NAMES),
        item_feature_names=list(ITEM_FEATURES),
        categories=categories,
        index=IndexSpec(type="flat", params={}),
        params={"seed": seed, "factory": "tests.bundle_factory.make_serving_bundle"},
        files={},
    )
    return finalize_bundle(out, manifest)
