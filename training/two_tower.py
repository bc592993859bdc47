"""Two-tower retrieval model: user and item towers trained with in-batch negatives (InfoNCE).

Sampled-softmax log-Q correction removes the popularity bias of in-batch negatives; event-type weights and
an empirical position-bias correction weight each positive. The user tower is exported once, as plain
weights (the bundle's `user_tower.npz`, served in numpy); item embeddings are precomputed for the
whole catalog.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from serve_app.contract import hash_bucket, title_tokens
from serve_app.schemas import USER_TOWER_WEIGHT_NAMES, USER_TOWER_WEIGHTS_FILE
from training.config import TwoTowerConfig
from training.evaluate import score_block_rows
from training.features import TrainingRows, UserStates

log = logging.getLogger(__name__)


class UserTower(nn.Module):
    """Hashed user id + profile features + mean of recent item embeddings -> unit vector."""

    def __init__(
        self,
        user_buckets: int,
        n_items: int,
        profile_dim: int,
        hidden: int,
        dim: int,
        sparse: bool = False,
    ):
        super().__init__()
        # bucket 0: unknown user
        self.user_embedding = nn.Embedding(user_buckets + 1, hidden, sparse=sparse)
        self.history_embedding = nn.Embedding(n_items + 1, hidden, padding_idx=0, sparse=sparse)
        self.profile_proj = nn.Linear(profile_dim, hidden)
        self.mlp = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, user_bucket: Tensor, profile: Tensor, recent: Tensor) -> Tensor:
        mask = (recent > 0).to(torch.float32).unsqueeze(-1)
        history = (self.history_embedding(recent) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        x = torch.cat([self.user_embedding(user_bucket), self.profile_proj(profile), history], 1)
        return F.normalize(self.mlp(x), dim=-1)


class ItemTower(nn.Module):
    """Hashed item id + category + numeric features + hashed title tokens -> unit vector."""

    def __init__(
        self,
        item_buckets: int,
        n_categories: int,
        token_buckets: int,
        n_numeric: int,
        hidden: int,
        dim: int,
        sparse: bool = False,
    ):
        super().__init__()
        self.id_embedding = nn.Embedding(item_buckets, hidden, sparse=sparse)
        self.category_embedding = nn.Embedding(n_categories, hidden)
        self.token_embedding = nn.EmbeddingBag(
            token_buckets + 1, hidden, mode="mean", padding_idx=0, sparse=sparse
        )
        self.numeric_proj = nn.Linear(n_numeric, hidden)
        self.mlp = nn.Sequential(nn.Linear(4 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(
        self, item_bucket: Tensor, category: Tensor, tokens: Tensor, numeric: Tensor
    ) -> Tensor:
        x = torch.cat(
            [
                self.id_embedding(item_bucket),
                self.category_embedding(category),
                self.token_embedding(tokens),
                self.numeric_proj(numeric),
            ],
            1,
        )
        return F.normalize(self.mlp(x), dim=-1)


@dataclass(frozen=True)
class ItemInputs:
    """The item tower's inputs for every catalog item, in item-index order."""

    bucket: Tensor  # int64 [n]
    category: Tensor  # int64 [n]
    tokens: Tensor  # int64 [n, T], 0 = padding
    numeric: Tensor  # float32 [n, F]

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.bucket[idx], self.category[idx], self.tokens[idx], self.numeric[idx]


def item_inputs(
    catalog: pd.DataFrame, category_codes: np.ndarray, config: TwoTowerConfig
) -> ItemInputs:
    """Encode the catalog for the item tower (ids and title tokens hashed, price standardised)."""
    n = len(catalog)
    tokens = np.zeros((n, config.max_title_tokens), dtype=np.int64)
    for i, title in enumerate(catalog["title"].to_numpy()):
        toks = title_tokens(str(title))[: config.max_title_tokens]
        tokens[i, : len(toks)] = [hash_bucket(t, config.token_buckets) + 1 for t in toks]
    log_price = np.log1p(catalog["price"].to_numpy(np.float64))
    numeric = ((log_price - log_price.mean()) / (log_price.std() + 1e-6))[:, None]
    buckets = [hash_bucket(str(i), config.item_buckets) for i in catalog["item_id"]]
    return ItemInputs(
        bucket=torch.tensor(buckets, dtype=torch.int64),
        category=torch.tensor(category_codes, dtype=torch.int64),
        tokens=torch.from_numpy(tokens),
        numeric=torch.tensor(numeric, dtype=torch.float32),
    )


def user_buckets(user_ids: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket 1..buckets per user id; 0 is reserved for an unknown user."""
    return np.fromiter(
        (hash_bucket(str(u), buckets) + 1 for u in user_ids), np.int64, len(user_ids)
    )


def position_propensity(
    shown_positions: np.ndarray, click_positions: np.ndarray, max_position: int = 50
) -> np.ndarray:
    """Empirical examination propensity per slate position: CTR(position) / CTR(0), smoothed.

    Unbiased when slates place items at random positions (as the generator and an exploration slice
    do); otherwise a first-order estimate. Positions outside [0, max_position) are ignored.
    """
    shown = shown_positions[(shown_positions >= 0) & (shown_positions < max_position)]
    clicks = click_positions[(click_positions >= 0) & (click_positions < max_position)]
    n_shown = np.bincount(shown, minlength=max_position).astype(np.float64)
    n_clicks = np.bincount(clicks, minlength=max_position).astype(np.float64)
    prior = n_clicks.sum() / max(n_shown.sum(), 1.0)
    ctr = (n_clicks + 20 * prior) / (n_shown + 20)
    return np.asarray(ctr / ctr[0]) if ctr[0] > 0 else np.ones(max_position)


@dataclass
class TwoTowerResult:
    user_tower: UserTower
    item_embeddings: np.ndarray  # float32 [n_items, dim], unit rows
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    item_tower: ItemTower | None = None  # kept so that training can continue from here


def encode_users(
    tower: UserTower, states: UserStates, config: TwoTowerConfig, batch: int = 4096
) -> np.ndarray:
    """User vectors for a batch of user states (known users use their id bucket)."""
    buckets = torch.from_numpy(user_buckets(states.user_ids, config.user_buckets))
    unknown = torch.from_numpy(states.event_count == 0)
    buckets[unknown] = 0
    profile = torch.from_numpy(states.profile())
    recent = torch.from_numpy(states.recent_items)
    out = []
    tower.eval()
    with torch.no_grad():
        for s in range(0, len(buckets), batch):
            out.append(tower(buckets[s : s + batch], profile[s : s + batch], recent[s : s + batch]))
    return torch.cat(out).numpy() if out else np.zeros((0, config.embedding_dim), np.float32)


def encode_items(tower: ItemTower, items: ItemInputs, batch: int = 8192) -> np.ndarray:
    tower.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(items.bucket), batch):
            idx = torch.arange(s, min(s + batch, len(items.bucket)))
            out.append(tower(*items.take(idx)))
    return torch.cat(out).numpy().astype(np.float32)


def recall_against(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    states: UserStates,
    relevant: list[np.ndarray],
    k: int,
) -> float:
    """Recall@k of exact dot-product retrieval, excluding seen items (early-stopping signal).

    Scored in blocks of users (`score_block_rows`), each reduced to its top k before the next."""
    hits, total = 0.0, 0
    block = score_block_rows(item_vecs.shape[0])
    for s in range(0, len(user_vecs), block):
        scores = user_vecs[s : s + block] @ item_vecs.T
        seen = states.seen[s : s + block].tocoo()
        scores[seen.row, seen.col] = -np.inf
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        for row, rel in zip(top, relevant[s : s + block], strict=True):
            if len(rel):
                hits += len(np.intersect1d(row, rel)) / len(rel)
                total += 1
    return hits / max(total, 1)


def sample_rows(n: int, bound: int, seed: int) -> np.ndarray | None:
    """Sorted row indices of a seeded sample of `bound` out of `n`; None when n <= bound (all)."""
    if n <= bound:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=bound, replace=False))


def take_states(states: UserStates, rows: np.ndarray) -> UserStates:
    """The users at `rows` of `states`."""
    return UserStates(
        states.user_ids[rows],
        states.event_count[rows],
        states.category_prefs[rows],
        states.recent_items[rows],
        states.seen[rows],
    )


def uses_sparse_embeddings(config: TwoTowerConfig, n_items: int) -> bool:
    """Sparse gradients for the id and history tables (SparseAdam) from this catalog size on."""
    return n_items >= config.sparse_embeddings_min_items


def optimizers(
    modules: list[nn.Module], config: TwoTowerConfig, sparse: bool
) -> list[torch.optim.Optimizer]:
    """AdamW over every parameter; with `sparse`, SparseAdam over the sparse embedding tables
    (a step updates the rows the batch touched: O(batch), not O(table)) and AdamW over the rest."""
    params = [p for m in modules for p in m.parameters()]
    if not sparse:
        return [
            torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        ]
    tables = [
        sub.weight
        for m in modules
        for sub in m.modules()
        if isinstance(sub, nn.Embedding | nn.EmbeddingBag) and sub.sparse
    ]
    ids = {id(p) for p in tables}
    dense = [p for p in params if id(p) not in ids]
    return [
        torch.optim.SparseAdam(tables, lr=config.learning_rate),
        torch.optim.AdamW(dense, lr=config.learning_rate, weight_decay=config.weight_decay),
    ]


def train_two_tower(
    rows: TrainingRows,
    items: ItemInputs,
    n_categories: int,
    propensity: np.ndarray,
    valid_states: UserStates | None,
    valid_relevant: list[np.ndarray],
    config: TwoTowerConfig,
    progress: bool = True,
    init: TwoTowerResult | None = None,
) -> TwoTowerResult:
    """Train both towers; keep the epoch with the best validation recall@50.

    `init`: start from these towers (same config) instead of a random initialisation.

    `valid_states` None: no validation (a refit for a number of epochs chosen before): all
    `config.epochs` run and the last is kept.
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    n_items = len(items.bucket)
    sparse = uses_sparse_embeddings(config, n_items)
    user_tower = UserTower(
        config.user_buckets,
        n_items,
        1 + rows.prefs.shape[1],
        config.hidden_dim,
        config.embedding_dim,
        sparse=sparse,
    )
    item_tower = ItemTower(
        config.item_buckets,
        n_categories,
        config.token_buckets,
        items.numeric.shape[1],
        config.hidden_dim,
        config.embedding_dim,
        sparse=sparse,
    )
    if init is not None:
        if init.item_tower is None:
            raise ValueError("init has no item tower to continue from")
        user_tower.load_state_dict(init.user_tower.state_dict())
        item_tower.load_state_dict(init.item_tower.state_dict())
    opts = optimizers([user_tower, item_tower], config, sparse)
    if valid_states is not None:
        # Early stopping reads recall on a seeded sample of the validation users (a bound).
        bound = min(config.validation_max_users, max(500, config.validation_max_scores // n_items))
        keep = sample_rows(len(valid_states.user_ids), bound, config.seed)
        if keep is not None:
            valid_states = take_states(valid_states, keep)
            valid_relevant = [valid_relevant[i] for i in keep]

    # Per-row weight: event-type weight x inverse examination propensity (capped).
    pos = rows.position
    prop = np.where(pos >= 0, propensity[np.clip(pos, 0, len(propensity) - 1)], 1.0)
    ipw = np.minimum(config.max_ipw, prop.clip(1e-6) ** -config.position_bias_power)
    weights = torch.tensor(rows.weight * ipw, dtype=torch.float32)
    # log-Q: in-batch negatives are drawn with the items' frequency among training rows.
    freq = np.bincount(rows.item, minlength=n_items).astype(np.float64) + 1.0
    log_q = torch.tensor(np.log(freq / freq.sum()), dtype=torch.float32)

    buckets_all = torch.from_numpy(user_buckets(rows.user_ids, config.user_buckets))
    recent_all = torch.from_numpy(rows.recent)
    item_all = torch.from_numpy(rows.item)

    result = TwoTowerResult(user_tower, np.zeros((n_items, config.embedding_dim), np.float32))
    result.item_tower = item_tower
    best, best_state, stale = -1.0, None, 0
    n = len(rows.item)
    for epoch in range(1, config.epochs + 1):
        user_tower.train()
        item_tower.train()
        perm = torch.from_numpy(rng.permutation(n))
        total = 0.0
        steps = range(0, n, config.batch_size)
        bar = tqdm(
            steps, desc=f"two-tower epoch {epoch}", unit="batch", disable=not progress, leave=False
        )
        for s in bar:
            idx = perm[s : s + config.batch_size]
            if len(idx) < 2:
                continue
            b = buckets_all[idx].clone()
            b[torch.rand(len(idx)) < config.user_id_dropout] = 0
            profile = torch.from_numpy(rows.profile(idx.numpy()))
            u = user_tower(b, profile, recent_all[idx].long())
            target = item_all[idx]
            v = item_tower(*items.take(target))
            logits = u @ v.T / config.temperature - config.logq_strength * log_q[target][None, :]
            # Another row's positive for the same item is not a negative.
            same = (target[:, None] == target[None, :]) & ~torch.eye(len(idx), dtype=torch.bool)
            logits = logits.masked_fill(same, -1e9)
            labels = torch.arange(len(idx))
            w = weights[idx]
            loss = (F.cross_entropy(logits, labels, reduction="none") * w).sum() / w.sum()
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
            total += float(loss.detach()) * len(idx)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        item_vecs = encode_items(item_tower, items)

        def snapshot(
            vecs: np.ndarray,
        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], np.ndarray]:
            return (
                {k: v.clone() for k, v in user_tower.state_dict().items()},
                {k: v.clone() for k, v in item_tower.state_dict().items()},
                vecs,
            )

        if valid_states is None:
            result.history.append({"epoch": epoch, "loss": total / n})
            result.best_epoch, best, best_state = epoch, 0.0, snapshot(item_vecs)
            log.info("two-tower epoch %d: loss %.4f (no validation)", epoch, total / n)
            continue
        user_vecs = encode_users(user_tower, valid_states, config)
        recall = recall_against(user_vecs, item_vecs, valid_states, valid_relevant, 50)
        result.history.append({"epoch": epoch, "loss": total / n, "valid_recall@50": recall})
        log.info("two-tower epoch %d: loss %.4f valid recall@50 %.4f", epoch, total / n, recall)
        if recall > best + 1e-4:
            best, stale, result.best_epoch = recall, 0, epoch
            best_state = snapshot(item_vecs)
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        user_tower.load_state_dict(best_state[0])
        item_tower.load_state_dict(best_state[1])
        result.item_embeddings = best_state[2]
    user_tower.eval()
    if not math.isfinite(best):
        raise RuntimeError("two-tower training produced no finite validation score")
    return result


def export_user_tower(tower: UserTower, directory: Path) -> None:
    """Save the user tower into a bundle directory, once: its weights as float32 arrays
    (`user_tower.npz`, `USER_TOWER_WEIGHT_NAMES`, uncompressed so that serving memory-maps them),
    loadable without pickle and without torch; serving runs them in numpy. No TorchScript copy:
    at a million items it would ship the 512 MB history table a second time."""
    state = tower.state_dict()
    if tuple(state) != USER_TOWER_WEIGHT_NAMES:
        # The numpy forward (serve_app.stages.user_tower) is this architecture, array for array.
        raise ValueError(
            f"user tower weights {list(state)} are not {list(USER_TOWER_WEIGHT_NAMES)}"
        )
    arrays = {
        name: value.detach().cpu().numpy().astype(np.float32) for name, value in state.items()
    }
    np.savez(directory / USER_TOWER_WEIGHTS_FILE, **arrays)


def read_user_tower(directory: Path) -> UserTower:
    """The torch module of a bundle's `user_tower.npz` (the inverse of `export_user_tower`), for
    offline scoring that wants torch's forward beside serving's numpy one. No pickle."""
    with np.load(directory / USER_TOWER_WEIGHTS_FILE, allow_pickle=False) as npz:
        state = {name: torch.from_numpy(npz[name].copy()) for name in USER_TOWER_WEIGHT_NAMES}
    buckets = state["user_embedding.weight"].shape[0] - 1
    n_items = state["history_embedding.weight"].shape[0] - 1
    hidden, profile_dim = state["profile_proj.weight"].shape
    dim = state["mlp.2.weight"].shape[0]
    tower = UserTower(buckets, n_items, profile_dim, hidden, dim)
    tower.load_state_dict(state)
    return tower.eval()
