"""Model-input contract: pure functions that training and serving must compute identically.

Feature hashing, title tokens and the ranker's feature matrix are part of the bundle format: a model trained
on one definition and served with another is silent train/serve skew. Both sides import them from here (the
only serve_app module besides `schemas` that `training` may import); numpy only, no I/O.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

TOKEN_PATTERN = re.compile(r"[a-z0-9]+")

# Columns of the bundle's item_features.npy, in order.
ITEM_FEATURE_NAMES = ("log_pop_all", "log_pop_7d", "log_pop_1d", "ctr", "age_days", "log_price")
# Columns of the ranker's input matrix, in order (the manifest's `ranker_features`).
RANKER_FEATURE_NAMES = (
    "retrieval_score",
    "retrieval_rank",
    *(f"item_{n}" for n in ITEM_FEATURE_NAMES),
    "user_category_affinity",
    "user_recent_category_share",
    "user_log_activity",
    "user_recent_count",
)


def hash_bucket(value: str, buckets: int) -> int:
    """Stable hash of an id or token into [0, buckets): identical in every process and release."""
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


def title_tokens(title: str) -> list[str]:
    """Lower-case alphanumeric tokens of a title, as the item tower sees them."""
    return TOKEN_PATTERN.findall(title.lower())


def ranker_features(
    candidates: np.ndarray,
    retrieval_scores: np.ndarray,
    item_features: np.ndarray,
    item_categories: np.ndarray,
    category_prefs: np.ndarray,
    event_count: np.ndarray,
    recent_items: np.ndarray,
) -> np.ndarray:
    """The ranker's input matrix, one row per (user, candidate), users major.

    candidates: int [B, N] item indices (-1 = padding, rows of zeros are produced for it);
    retrieval_scores: float [B, N]; item_features: float [n_items, len(ITEM_FEATURE_NAMES)];
    item_categories: int [n_items]; category_prefs: float [B, C]; event_count: float [B];
    recent_items: int [B, L] item index + 1, 0 = padding.
    Returns float32 [B * N, len(RANKER_FEATURE_NAMES)].
    """
    b, n = candidates.shape
    safe = np.where(candidates >= 0, candidates, 0)
    cats = item_categories[safe]  # [B, N]
    rank = np.broadcast_to(np.arange(n, dtype=np.float32), (b, n))
    affinity = np.take_along_axis(category_prefs, cats, axis=1)
    recent_mask = recent_items > 0
    recent_cats = np.where(recent_mask, item_categories[np.maximum(recent_items - 1, 0)], -1)
    recent_count = recent_mask.sum(axis=1).astype(np.float32)
    same = (recent_cats[:, None, :] == cats[:, :, None]).sum(axis=2)
    recent_share = same / np.maximum(recent_count, 1.0)[:, None]
    per_user = np.stack(
        [
            np.broadcast_to(np.log1p(event_count)[:, None], (b, n)),
            np.broadcast_to(recent_count[:, None], (b, n)),
        ],
        axis=2,
    )
    x = np.concatenate(
        [
            retrieval_scores[:, :, None],
            rank[:, :, None],
            item_features[safe],
            affinity[:, :, None],
            recent_share[:, :, None],
            per_user,
        ],
        axis=2,
    ).astype(np.float32)
    x[candidates < 0] = 0.0
    return x.reshape(b * n, len(RANKER_FEATURE_NAMES))
