"""Synthetic interaction log with planted structure, so that recommendation quality is measurable.

Users prefer one to four categories and have a latent taste vector; items belong to a category, sit
near its centre in the latent space, have Zipf popularity, a hidden quality and a creation date (new items
get a popularity boost). Impressions come from a mix of personalised and popular slates; a position-bias
click model turns them into views, clicks, add-to-carts, purchases and skips. Deterministic by seed;
vectorised so that 1M items / 10M events fit in memory and minutes.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from tqdm import tqdm

from training.config import SyntheticConfig
from training.data import Dataset, normalize_catalog, normalize_events

START = pd.Timestamp("2026-01-01", tz="UTC")
SLATE_SIZE = 10
PERSONALISED_SHARE = 0.8
# Click model: P(click) = bias(position) * sigmoid(AFFINITY * <u, v> + QUALITY * q + OFFSET).
AFFINITY, QUALITY, OFFSET = 4.0, 0.8, -1.5
POSITION_BIAS = 1.0 / (1.0 + np.arange(SLATE_SIZE)) ** 0.7
CART_RATE, PURCHASE_RATE, SKIP_RATE = 0.35, 0.5, 0.15
NEW_ITEM_BOOST, NEW_ITEM_DAYS = 3.0, 7.0
MAX_USER_CATEGORIES = 4

_WORDS = [
    "lamp", "mug", "chair", "shirt", "novel", "phone", "cable", "shoe", "candle", "clock",
    "plate", "towel", "guitar", "drone", "tent", "scarf", "poster", "kettle", "helmet", "pillow",
]  # fmt: skip
_ADJECTIVES = ["red", "vintage", "smart", "classic", "mini", "deluxe", "eco", "pro", "soft", "bold"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def generate(config: SyntheticConfig, progress: bool = True) -> Dataset:
    """Generate a data set; `truth` holds the planted user/item vectors, quality and preferences."""
    rng = np.random.default_rng(config.seed)
    n_users, n_items, n_cat, dim = (
        config.n_users,
        config.n_items,
        config.n_categories,
        config.latent_dim,
    )

    # Items: category, latent vector near the category centre, Zipf popularity, quality, creation time.
    centres = _unit(rng.normal(size=(n_cat, dim)))
    item_cat = rng.integers(0, n_cat, size=n_items)
    item_vec = _unit(centres[item_cat] + 0.7 * rng.normal(size=(n_items, dim)) / math.sqrt(dim))
    pop_rank = rng.permutation(n_items) + 1
    item_pop = 1.0 / pop_rank.astype(np.float64) ** config.zipf_exponent
    item_quality = rng.normal(size=n_items)
    # 80% of items exist before the log starts; the rest appear during it.
    created_frac = np.where(
        rng.random(n_items) < 0.8, -rng.random(n_items), rng.random(n_items) * 0.9
    )
    created_days = created_frac * config.days
    price = np.round(np.exp(rng.normal(2.5 + 0.1 * (item_cat % 7), 0.6, size=n_items)), 2)

    # Users: a few preferred categories, a taste vector built from them, an activity level.
    # Each user prefers 1..MAX_USER_CATEGORIES categories (about 2 on average), stored sparsely so that
    # a million users over hundreds of categories stays small.
    n_pref = 1 + np.minimum(rng.poisson(1.0, size=n_users), MAX_USER_CATEGORIES - 1)
    user_cats = np.argsort(rng.random((n_users, n_cat)), axis=1)[:, :MAX_USER_CATEGORIES]
    if n_cat < MAX_USER_CATEGORIES:
        user_cats = np.pad(user_cats, ((0, 0), (0, MAX_USER_CATEGORIES - n_cat)), mode="edge")
    user_w = rng.dirichlet(np.ones(MAX_USER_CATEGORIES), size=n_users)
    user_w[np.arange(MAX_USER_CATEGORIES)[None, :] >= n_pref[:, None]] = 0.0
    user_w /= user_w.sum(axis=1, keepdims=True)
    user_vec = _unit(
        np.einsum("uk,ukd->ud", user_w, centres[user_cats]) + 0.15 * rng.normal(size=(n_users, dim))
    )
    activity = rng.lognormal(0.0, 0.8, size=n_users)
    activity /= activity.sum()

    # Impressions: user by activity, time uniform, slate position uniform.
    n_imp = max(1, int(config.n_events / 1.25))
    users = rng.choice(n_users, size=n_imp, p=activity)
    days = np.sort(rng.random(n_imp)) * config.days
    positions = rng.integers(0, SLATE_SIZE, size=n_imp)
    personalised = rng.random(n_imp) < PERSONALISED_SHARE
    # Personalised slots draw a category from the user's preferences; the rest from item popularity.
    cum_w = np.cumsum(user_w, axis=1)
    slot = (cum_w[users] < rng.random(n_imp)[:, None]).sum(axis=1).clip(0, MAX_USER_CATEGORIES - 1)
    cats = user_cats[users, slot]

    # Sampling weights change with time (new-item boost), so sample per (time bucket, category).
    n_buckets = int(min(config.days, max(4, 20_000_000 // max(n_items, 1))))
    bucket = np.minimum((days / config.days * n_buckets).astype(np.int64), n_buckets - 1)
    items = np.empty(n_imp, dtype=np.int64)
    cat_members = [np.flatnonzero(item_cat == c) for c in range(n_cat)]
    groups = tqdm(range(n_buckets), desc="generate", unit="bucket", disable=not progress)
    for b in groups:
        # Only items that exist when the bucket starts can be shown anywhere in it.
        available = created_days <= b / n_buckets * config.days
        age = ((b + 0.5) / n_buckets * config.days - created_days).clip(0)
        weight = np.where(
            available, item_pop * (1 + NEW_ITEM_BOOST * np.exp(-age / NEW_ITEM_DAYS)), 0.0
        )
        in_bucket = bucket == b
        glob = np.flatnonzero(in_bucket & ~personalised)
        if len(glob):
            cdf = np.cumsum(weight)
            items[glob] = np.searchsorted(cdf, rng.random(len(glob)) * cdf[-1], side="right")
        pers = np.flatnonzero(in_bucket & personalised)
        for c in np.unique(cats[pers]):
            rows = pers[cats[pers] == c]
            members = cat_members[c]
            w = weight[members]
            if len(members) == 0 or w.sum() <= 0:
                members, w = np.arange(n_items), weight
            cdf = np.cumsum(w)
            items[rows] = members[
                np.searchsorted(cdf, rng.random(len(rows)) * cdf[-1], side="right")
            ]
    items = items.clip(0, n_items - 1)

    # Position-biased clicks, then add-to-cart and purchase funnels; some unclicked views are skips.
    affinity = np.einsum("ij,ij->i", user_vec[users], item_vec[items])
    p_click = POSITION_BIAS[positions] / (
        1 + np.exp(-(AFFINITY * affinity + QUALITY * item_quality[items] + OFFSET))
    )
    click = rng.random(n_imp) < p_click
    cart = click & (rng.random(n_imp) < CART_RATE * (0.5 + affinity.clip(0, 1)))
    purchase = cart & (rng.random(n_imp) < PURCHASE_RATE)
    skip = ~click & (rng.random(n_imp) < SKIP_RATE)

    # Each impression yields a view (or skip); engagement adds follow-up events seconds later.
    seconds = days * 86_400.0
    base = np.full(n_imp, "view", dtype=object)
    base[skip] = "skip"
    frames = [(np.arange(n_imp), base, seconds)]
    for mask, kind, delay in (
        (click, "click", 5.0),
        (cart, "add_to_cart", 30.0),
        (purchase, "purchase", 90.0),
    ):
        idx = np.flatnonzero(mask)
        frames.append((idx, np.full(len(idx), kind, dtype=object), seconds[idx] + delay))
    rows = np.concatenate([f[0] for f in frames])
    kinds = np.concatenate([f[1] for f in frames])
    secs = np.concatenate([f[2] for f in frames])
    events = pd.DataFrame(
        {
            "user_id": np.char.add("u", users[rows].astype(str)),
            "item_id": np.char.add("i", items[rows].astype(str)),
            "event_type": kinds,
            "timestamp": START + pd.to_timedelta(secs, unit="s"),
            "position": positions[rows].astype(np.int32),
            "session_id": np.char.add(
                np.char.add("s", users[rows].astype(str)),
                np.char.add("-", days[rows].astype(int).astype(str)),
            ),
        }
    )
    catalog = pd.DataFrame(
        {
            "item_id": np.char.add("i", np.arange(n_items).astype(str)),
            "category": np.char.add("cat", item_cat.astype(str)),
            "price": price,
            "title": [
                f"{_ADJECTIVES[int(i) % len(_ADJECTIVES)]} {_WORDS[int(c) % len(_WORDS)]} c{int(c)} model {int(i)}"
                for i, c in zip(range(n_items), item_cat, strict=True)
            ],
            "created_at": START + pd.to_timedelta(created_days, unit="D"),
        }
    )
    truth = {
        "user_vectors": user_vec.astype(np.float32),
        "item_vectors": item_vec.astype(np.float32),
        "item_quality": item_quality.astype(np.float32),
        "item_categories": item_cat.astype(np.int32),
        "user_categories": user_cats.astype(np.int32),
        "user_category_weights": user_w.astype(np.float32),
    }
    return Dataset(
        name=f"synthetic-{n_users}u-{n_items}i-seed{config.seed}",
        events=normalize_events(events),
        catalog=normalize_catalog(catalog),
        truth=truth,
    )


def click_probability(
    truth: dict[str, np.ndarray], user: np.ndarray, item: np.ndarray, position: np.ndarray
) -> np.ndarray:
    """The planted click model: the true P(click) of showing `item` to `user` at `position`."""
    affinity = np.einsum("ij,ij->i", truth["user_vectors"][user], truth["item_vectors"][item])
    logits = AFFINITY * affinity + QUALITY * truth["item_quality"][item] + OFFSET
    bias = POSITION_BIAS[np.minimum(position, SLATE_SIZE - 1)]
    return np.asarray(bias / (1 + np.exp(-logits)))
