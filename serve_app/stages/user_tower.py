"""The user tower stage, pure: tower inputs from online features, one forward pass per batch, the
real-time delta added. Twin of its host, `serve_app.deployments.user_tower`; loads only the tower
(`user_tower.npz`, memory-mapped and run in numpy: serving never imports torch) and the item ids, to
read histories.

Semantics follow the offline evaluation exactly (`training.two_tower.encode_users`): user bucket =
hash_bucket(user_id, user_buckets) + 1, or 0 for a user whose snapshot has no positive event; profile
= [log1p(event_count), category_prefs] in float32; history = item row + 1, newest first, 0-padded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from serve_app.config import RankingConfig
from serve_app.contract import hash_bucket
from serve_app.ids import ItemIndex
from serve_app.schemas import BundleManifest
from serve_app.stages.catalog import BundleTerms
from serve_app.stages.records import Query, UserState

if TYPE_CHECKING:  # serve_app.features imports Feast (seconds): only the deployment reads it
    from serve_app.bundle import Bundle
    from serve_app.features import UserFeatures


class UserTowerForward(Protocol):
    """(user bucket int64 [B], profile float32 [B, P], recent int64 [B, L]) -> float32 [B, D]."""

    def __call__(
        self, buckets: np.ndarray, profile: np.ndarray, recent: np.ndarray
    ) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class NumpyUserTower:
    """`training.two_tower.UserTower.forward` in numpy, from the bundle's `user_tower.npz`: user
    embedding, profile projection and the mean of the non-padding history embeddings, concatenated,
    through Linear-ReLU-Linear, L2-normalised (as `F.normalize`: norm clamped at 1e-12)."""

    user_embedding: np.ndarray  # [user_buckets + 1, H]
    history_embedding: np.ndarray  # [num_items + 1, H]
    profile_weight: np.ndarray  # [H, P]
    profile_bias: np.ndarray  # [H]
    hidden_weight: np.ndarray  # [H, 3H]
    hidden_bias: np.ndarray  # [H]
    out_weight: np.ndarray  # [D, H]
    out_bias: np.ndarray  # [D]

    @classmethod
    def from_weights(cls, weights: Mapping[str, np.ndarray]) -> NumpyUserTower:
        """From the arrays `serve_app.bundle.load_user_tower_weights` checked (state dict names)."""
        return cls(
            user_embedding=weights["user_embedding.weight"],
            history_embedding=weights["history_embedding.weight"],
            profile_weight=weights["profile_proj.weight"],
            profile_bias=weights["profile_proj.bias"],
            hidden_weight=weights["mlp.0.weight"],
            hidden_bias=weights["mlp.0.bias"],
            out_weight=weights["mlp.2.weight"],
            out_bias=weights["mlp.2.bias"],
        )

    def __call__(self, buckets: np.ndarray, profile: np.ndarray, recent: np.ndarray) -> np.ndarray:
        mask = (recent > 0).astype(np.float32)[:, :, None]
        summed = (self.history_embedding[recent] * mask).sum(axis=1)
        history = summed / np.maximum(mask.sum(axis=1), np.float32(1.0))
        projected = profile.astype(np.float32) @ self.profile_weight.T + self.profile_bias
        x = np.concatenate([self.user_embedding[buckets], projected, history], axis=1)
        hidden = np.maximum(x @ self.hidden_weight.T + self.hidden_bias, np.float32(0.0))
        out = hidden @ self.out_weight.T + self.out_bias
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.asarray(out / np.maximum(norms, np.float32(1e-12)), dtype=np.float32)


@dataclass(frozen=True, eq=False)
class TowerModel:
    """What the user tower serves from: the tower's forward pass and the item id -> row map."""

    terms: BundleTerms
    tower: UserTowerForward
    item_index: ItemIndex

    @property
    def version(self) -> str:
        return self.terms.version

    @classmethod
    def from_bundle(cls, bundle: Bundle, terms: BundleTerms) -> TowerModel:
        return cls(terms, NumpyUserTower.from_weights(bundle.user_tower_weights), bundle.item_index)

    @classmethod
    def from_directory(
        cls, directory: Path, version: str, manifest: BundleManifest | None = None
    ) -> TowerModel:
        """`manifest`: the bundle's, already verified (`fetch_bundle` checked every file); None:
        verify the directory here. A bundle without `user_tower.npz` is refused
        (BundleIntegrityError): there is no TorchScript fallback."""
        from serve_app.bundle import load_item_ids, load_user_tower_weights, verify_bundle

        manifest = manifest or verify_bundle(directory)
        _, item_index = load_item_ids(directory, manifest)
        tower = NumpyUserTower.from_weights(load_user_tower_weights(directory, manifest))
        return cls(BundleTerms.from_manifest(manifest, version), tower, item_index)

    def warm(self) -> None:
        """The first calls are slow (numpy's first touch of the small weights): make them here."""
        c = len(self.terms.categories)
        for batch in (1, 2, 4, 8, 16, 32):
            user_vectors(
                self,
                np.zeros(batch, dtype=np.int64),
                np.zeros((batch, 1 + c), dtype=np.float32),
                np.zeros((batch, self.terms.history_length), dtype=np.int64),
            )


def encode_recent(item_ids: Sequence[str], item_index: ItemIndex, length: int) -> np.ndarray:
    """History as the tower reads it: row + 1 per known item, newest first, 0-padded to `length`.

    Items the bundle does not know (newer than its catalog) are skipped.
    """
    out = np.zeros(length, dtype=np.int64)
    rows = item_index.known_rows(item_ids)[:length] + 1
    out[: len(rows)] = rows
    return out


def tower_inputs(
    model: TowerModel,
    user_ids: Sequence[str],
    event_count: np.ndarray,
    category_prefs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(user bucket int64 [B], profile float32 [B, 1 + C]) exactly as `encode_users` builds them."""
    buckets = np.fromiter(
        (hash_bucket(u, model.terms.user_buckets) + 1 for u in user_ids), np.int64, len(user_ids)
    )
    buckets[event_count == 0] = 0
    count = np.log1p(event_count.astype(np.float32))[:, None].astype(np.float32)
    profile = np.hstack([count, category_prefs.astype(np.float32)]).astype(np.float32)
    return buckets, profile


def user_vectors(
    model: TowerModel, buckets: np.ndarray, profile: np.ndarray, recent: np.ndarray
) -> np.ndarray:
    """The user tower's forward pass: float32 [B, D], unit rows."""
    return model.tower(buckets, profile, recent)


def add_delta(vectors: np.ndarray, delta: np.ndarray, weight: float) -> np.ndarray:
    """Move each user vector toward its real-time delta embedding (EMA of interacted items).

    Rows without a delta are returned bit for bit: re-normalising an already unit vector would
    change its last digits and with them the offline/online parity.
    """
    out = vectors.copy()
    has = np.abs(delta).sum(axis=1) > 0
    if weight <= 0 or not has.any():
        return out
    moved = vectors[has] + np.float32(weight) * delta[has]
    norms = np.linalg.norm(moved, axis=1, keepdims=True)
    out[has] = moved / np.maximum(norms, 1e-12)
    return out


def embed_users(
    model: TowerModel,
    queries: Sequence[Query],
    features: UserFeatures,
    seen_items: Sequence[Sequence[str]] | None,
    ranking: RankingConfig,
) -> list[UserState]:
    """User states for a batch of queries (one bundle version) from their online features: one
    forward pass for the batch.

    `seen_items` is `user_profile:seen_items` per user (None: unread, then only the recent items are
    excluded and the results are marked degraded).
    """
    index = model.item_index
    length = model.terms.history_length
    user_ids = [q.user_id for q in queries]
    recent = np.stack([encode_recent(r, index, length) for r in features.recent_items])
    buckets, profile = tower_inputs(model, user_ids, features.event_count, features.category_prefs)
    base = user_vectors(model, buckets, profile, recent)
    vectors = add_delta(base, features.delta_embedding, ranking.delta_weight)
    states = []
    for row, query in enumerate(queries):
        seen_ids = set(features.recent_items[row])
        if seen_items is not None:
            seen_ids.update(seen_items[row])
        seen = np.unique(index.known_rows(seen_ids))
        count = float(features.event_count[row])
        interactions = max(int(count), len(seen_ids))
        states.append(
            UserState(
                query=query,
                vector=vectors[row] if interactions > 0 else None,
                event_count=count,
                category_prefs=features.category_prefs[row],
                recent=recent[row],
                seen=seen,
                interactions=interactions,
                degraded=features.degraded or seen_items is None,
                base_vector=base[row] if query.explain else None,
                delta_vector=features.delta_embedding[row] if query.explain else None,
            )
        )
    return states
