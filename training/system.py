"""The served system for one settings object: fit a bundle on a log, and score it as serving answers.

`fit_system` builds everything a bundle holds from one log: the ranker's labels inside that log
(`training.labels`), towers and collaborative models fit without them for the ranker's features, then
the towers trained on over the whole log (`two_tower.refit_epochs` more epochs), the collaborative
models and item statistics as of its end, which is what serving reads. `Served` loads the written bundle
and answers for a set of users through `serve_app.recommend.recommend_in_process` (the very stage
functions of the graph) from the `user_profile` rows those users would have: what `recserve train`
reports as recserve is what it registers.

Importing `serve_app.recommend` here is the one exception to "training imports only the contract":
the report must come from the serving code, not from a second implementation of it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from serve_app.contract import (
    ITEM_FEATURE_NAMES,
    KNOWN_USERS_FILE,
    Collaborative,
    known_user_keys,
)
from serve_app.schemas import BundleManifest, FeatureSpec, IndexSpec
from training import index as faiss_index
from training.collaborative import fit_collaborative, save_collaborative
from training.config import CollaborativeConfig, RankerConfig, TrainingSettings, TwoTowerConfig
from training.features import (
    EncodedLog,
    encode_log,
    item_stats_at,
    training_rows,
    user_states_at,
)
from training.labels import Window, label_window, relevant_lists, tail_labels
from training.ranker import (
    RankerResult,
    exact_candidates,
    graded_labels,
    ranking_inputs,
    train_ranker,
)
from training.registry import finalize_bundle
from training.split import time_fraction_cutoffs
from training.two_tower import (
    TwoTowerResult,
    encode_users,
    export_user_tower,
    item_inputs,
    position_propensity,
    train_two_tower,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ItemTable:
    """The catalog as arrays: row order = the bundle's item order."""

    frame: pd.DataFrame
    item_ids: np.ndarray  # str [n]
    index: pd.Index
    codes: np.ndarray  # int category index per item
    categories: list[str]
    created_ns: np.ndarray
    price: np.ndarray

    @classmethod
    def of(cls, catalog: pd.DataFrame) -> ItemTable:
        frame = catalog.reset_index(drop=True)
        item_ids = frame["item_id"].to_numpy(dtype=str)
        codes, names = pd.factorize(frame["category"], sort=True)
        return cls(
            frame,
            item_ids,
            pd.Index(item_ids),
            codes,
            [str(c) for c in names],
            pd.DatetimeIndex(frame["created_at"]).asi8.astype(np.int64),
            frame["price"].to_numpy(np.float64),
        )


@dataclass(frozen=True, eq=False)
class Log:
    """An events frame encoded against the catalog, with the columns the towers and labels need."""

    events: pd.DataFrame  # the encoded rows (items known to the catalog), time order
    encoded: EncodedLog
    event_types: np.ndarray
    positions: np.ndarray

    @property
    def end(self) -> pd.Timestamp:
        return pd.Timestamp(int(self.encoded.ts.max()) + 1, tz="UTC")

    @classmethod
    def of(cls, events: pd.DataFrame, items: ItemTable) -> Log:
        ts = pd.to_datetime(events["timestamp"], utc=True).to_numpy(dtype="datetime64[ns]")
        ordered = events.iloc[np.argsort(ts.astype(np.int64), kind="stable")]
        known = ordered.loc[items.index.get_indexer(pd.Index(ordered["item_id"])) >= 0]
        encoded = encode_log(known, items.index, items.codes, len(items.categories))
        return cls(
            known,
            encoded,
            known["event_type"].to_numpy(),
            known["position"].to_numpy() if "position" in known else np.full(len(known), -1),
        )


@dataclass(frozen=True, eq=False)
class RankerLabels:
    """The ranker's groups inside a log and the events its features may learn from."""

    groups: Window
    mask: np.ndarray  # bool over the log's events: everything the labels do not reveal
    stats_cutoff: pd.Timestamp  # item statistics of the ranker's features are as of this


def ranker_group_bound(ranker: RankerConfig, n_items: int) -> int:
    """Most ranker groups for a catalog of `n_items`: `max_groups`, fewer when each group's exact
    top candidates would make groups x items exceed `max_candidate_scores` (at least 2,000)."""
    return min(ranker.max_groups, max(2_000, ranker.max_candidate_scores // max(n_items, 1)))


def ranker_labels(data: Log, settings: TrainingSettings, history_length: int) -> RankerLabels:
    """Labels by `split.ranker_labels` (see `training.labels`), on a seeded sample of at most
    `ranker.max_groups` labelled users (fewer on a big catalog: `ranker.max_candidate_scores`)."""
    split, seed = settings.split, settings.ranker.seed
    bound = ranker_group_bound(settings.ranker, data.encoded.n_items)
    if split.ranker_labels == "window":
        (start,) = time_fraction_cutoffs(data.events, (split.ranker_fraction,))
        groups = label_window(
            data.encoded, start, None, history_length, data.event_types, bound, seed
        )
        return RankerLabels(groups, data.encoded.before(start), start)
    groups, mask = tail_labels(
        data.encoded,
        data.end,
        split.ranker_tail_fraction,
        history_length,
        data.event_types,
        bound,
        seed,
    )
    return RankerLabels(groups, mask, data.end)


def tower_config(settings: TrainingSettings, n_users: int, n_items: int) -> TwoTowerConfig:
    """Hash tables sized to the data (2x distinct ids keeps collisions rare), capped by settings."""
    tt = settings.two_tower
    return tt.model_copy(
        update={
            "user_buckets": min(tt.user_buckets, max(1024, 2 * n_users)),
            "item_buckets": min(tt.item_buckets, max(1024, 2 * n_items)),
        }
    )


def fit_tower(
    data: Log,
    items: ItemTable,
    tt: TwoTowerConfig,
    mask: np.ndarray,
    valid: Window | None,
    progress: bool,
    init: TwoTowerResult | None = None,
) -> TwoTowerResult:
    """Towers on the first positives within `mask`; early stopping on `valid` (None: tt.epochs),
    continuing from `init` when given."""
    torch.set_num_threads(tt.threads)
    e = data.encoded
    rows = training_rows(e, data.positions, mask, tt.history_length)
    shown = data.positions[mask & np.isin(data.event_types, ["view", "skip"])]
    clicked = data.positions[mask & (data.event_types == "click")]
    return train_two_tower(
        rows,
        item_inputs(items.frame, items.codes, tt),
        len(items.categories),
        position_propensity(shown, clicked),
        valid.states if valid is not None else None,
        relevant_lists(valid.grades) if valid is not None else [],
        tt,
        progress=progress,
        init=init,
    )


def collaborative_model(
    data: EncodedLog, config: CollaborativeConfig, n_items: int
) -> Collaborative | None:
    """The bundle's collaborative models with the settings' signals (a model off: empty).

    Transitions, item-kNN and basket are sparse and fit at any catalog size; EASE (dense n x n)
    only up to `collaborative.max_items`, above which it is empty and the others stay on.
    """
    if not config.enabled or not (config.ease or config.transitions or config.knn or config.basket):
        return None
    if config.ease and n_items > config.max_items:
        log.warning("EASE off: %d items > collaborative.max_items (the sparse ones on)", n_items)
        if not (config.transitions or config.knn or config.basket):
            return None
    return fit_collaborative(data, None, config)


@dataclass
class FitCache:
    """What trials of one round share: labels and towers per label scheme, collaborative models
    per configuration (so a trial that changes only the ranker refits only the ranker)."""

    labels: dict[str, RankerLabels] = field(default_factory=dict)
    ranking_towers: dict[str, TwoTowerResult] = field(default_factory=dict)
    serving_towers: dict[str, TwoTowerResult] = field(default_factory=dict)
    collaborative: dict[tuple[Any, ...], Collaborative | None] = field(default_factory=dict)

    def cf(
        self, key: str, data: EncodedLog, config: CollaborativeConfig, n_items: int
    ) -> Collaborative | None:
        fields = config.model_dump(exclude={"max_items"})
        k = (key, tuple(sorted(fields.items())))
        if k not in self.collaborative:
            self.collaborative[k] = collaborative_model(data, config, n_items)
        return self.collaborative[k]


@dataclass(frozen=True, eq=False)
class FittedSystem:
    """Everything a bundle is written from."""

    tt: TwoTowerConfig
    towers: TwoTowerResult  # the served towers (whole log)
    ranker: RankerResult
    collaborative: Collaborative | None
    ranker_feature_names: tuple[str, ...]
    ranker_groups: int
    tower_epochs: int


def fit_system(
    settings: TrainingSettings,
    data: Log,
    items: ItemTable,
    cache: FitCache | None = None,
    *,
    progress: bool = False,
) -> FittedSystem:
    """Fit the bundle's models on `data` with `settings` (see the module docstring)."""
    cache = cache or FitCache()
    e = data.encoded
    tt = tower_config(settings, len(e.user_ids), len(items.item_ids))
    scheme = settings.split.ranker_labels
    if scheme not in cache.labels:
        cache.labels[scheme] = ranker_labels(data, settings, tt.history_length)
    labels = cache.labels[scheme]
    if scheme not in cache.ranking_towers:
        cache.ranking_towers[scheme] = fit_tower(
            data, items, tt, labels.mask, labels.groups, progress
        )
    ranking_towers = cache.ranking_towers[scheme]
    if scheme not in cache.serving_towers:
        # The served towers: the ranker's, trained on further over the whole log.
        everything = np.ones(len(e.ts), dtype=bool)
        cache.serving_towers[scheme] = fit_tower(
            data,
            items,
            tt.model_copy(update={"epochs": tt.refit_epochs}),
            everything,
            None,
            progress,
            init=ranking_towers,
        )
    serving_towers = cache.serving_towers[scheme]

    cf = settings.collaborative
    kept = e.subset(labels.mask)
    cf_rank = cache.cf(f"{scheme}:kept", kept, cf, e.n_items)
    groups = labels.groups
    stats = item_stats_at(kept, labels.stats_cutoff, items.created_ns).matrix(items.price)
    inputs = ranking_inputs(
        encode_users(ranking_towers.user_tower, groups.states, tt),
        ranking_towers.item_embeddings,
        groups.states,
        stats,
        items.codes,
        settings.ranker.candidates,
        cf_rank,
        progress=progress,
    )
    y = graded_labels(inputs.candidates, groups.grades)
    ranker = train_ranker(
        inputs.features,
        y.ravel(),
        inputs.candidates.shape[1],
        settings.ranker,
        inputs.names,
        inputs.valid,
        progress=progress,
    )
    return FittedSystem(
        tt=tt,
        towers=serving_towers,
        ranker=ranker,
        collaborative=cache.cf("all", e, cf, e.n_items),
        ranker_feature_names=inputs.names,
        ranker_groups=ranker.train_groups,
        tower_epochs=ranking_towers.best_epoch + tt.refit_epochs,
    )


def popularity_json(
    stats_pop: np.ndarray,
    item_ids: np.ndarray,
    categories: np.ndarray,
    names: list[str],
    top: int = 500,
) -> dict[str, Any]:
    """Cold-start lists: items by recent popularity, globally and per category."""
    order = np.argsort(-stats_pop, kind="stable")
    by_category = {
        names[c]: [str(item_ids[i]) for i in order[categories[order] == c][:100]]
        for c in range(len(names))
    }
    return {
        "global": [str(item_ids[i]) for i in order[:top]],
        "scores": [float(stats_pop[i]) for i in order[:top]],
        "by_category": by_category,
    }


def write_bundle(
    directory: Path,
    settings: TrainingSettings,
    fitted: FittedSystem,
    data: Log,
    items: ItemTable,
    *,
    snapshot: str,
    metrics: dict[str, float] | None = None,
    params: dict[str, Any] | None = None,
) -> BundleManifest:
    """Write a bundle directory (serving's format, checksums in the manifest) and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    tt, L = fitted.tt, fitted.tt.history_length
    item_vecs = fitted.towers.item_embeddings.astype(np.float32)
    stats_end = item_stats_at(data.encoded, data.end, items.created_ns)
    export_user_tower(fitted.towers.user_tower, directory)
    np.save(directory / "item_ids.npy", items.item_ids.astype(str), allow_pickle=False)
    np.save(directory / "item_embeddings.npy", item_vecs, allow_pickle=False)
    np.save(directory / "item_features.npy", stats_end.matrix(items.price), allow_pickle=False)
    np.save(directory / "item_categories.npy", items.codes.astype(np.int32), allow_pickle=False)
    # The users of the training log: the event writer expires anyone else's real-time state sooner.
    np.save(
        directory / KNOWN_USERS_FILE, known_user_keys(data.encoded.user_ids), allow_pickle=False
    )
    index, index_report, index_config = bundle_index(settings, fitted, data, item_vecs)
    faiss_index.save_index(index, directory / "index.faiss")
    fitted.ranker.booster.save_model(str(directory / "ranker.ubj"))
    spec = (
        save_collaborative(fitted.collaborative, directory)
        if fitted.collaborative is not None
        else {}
    )
    pop_recent = stats_end.pop_7d + 0.01 * stats_end.pop_all
    (directory / "popularity.json").write_text(
        json.dumps(popularity_json(pop_recent, items.item_ids, items.codes, items.categories))
    )
    categories = items.categories
    manifest = BundleManifest(
        model_name=settings.model_name,
        created_at=datetime.now(UTC),
        data_snapshot_id=snapshot,
        embedding_dim=tt.embedding_dim,
        num_items=len(items.item_ids),
        user_tower={
            "format": "torchscript",
            "inputs": ["user_bucket", "profile", "recent"],
            "user_buckets": tt.user_buckets,
            "history_length": L,
            "profile_dim": 1 + len(categories),
            "profile_layout": ["log1p(event_count)", "category_prefs[categories]"],
            "unknown_user_bucket": 0,
            "bucket_offset": 1,
            "hash": "blake2b-64 little-endian mod user_buckets",
        },
        user_tower_inputs=[
            FeatureSpec(name="user_profile:event_count", dtype="float32"),
            FeatureSpec(
                name="user_profile:category_prefs", dtype="float32", shape=[len(categories)]
            ),
            FeatureSpec(name="user_realtime:recent_items", dtype="string", shape=[L]),
        ],
        ranker_features=list(fitted.ranker_feature_names),
        collaborative=spec,
        item_feature_names=list(ITEM_FEATURE_NAMES),
        categories=categories,
        index=IndexSpec(
            **faiss_index.index_spec(index, index_config),
            recall_at_100=index_report.recall_at_k,
            recall_queries=index_report.n_queries,
            recall_floor=index_config.recall_floor,
            build_seconds=index_report.build_seconds,
            search_p50_ms=index_report.p50_ms,
            search_p99_ms=index_report.p99_ms,
            fallback=index_report.fallback,
        ),
        metrics={"index_recall@100": index_report.recall_at_k, **(metrics or {})},
        params={**settings_params(settings, fitted), **(params or {})},
        files={},
    )
    return finalize_bundle(directory, manifest)


def bundle_index(
    settings: TrainingSettings, fitted: FittedSystem, data: Log, item_vecs: np.ndarray
) -> tuple[Any, faiss_index.IndexReport, faiss_index.IndexConfig]:
    """The bundle's index, built once (on `index.build_threads`) and checked: recall@100 against
    exact search, queried with the served user vectors of users sampled from the log (their state at
    its end, through the served user tower: what serving computes from their `user_profile` rows).
    Below `index.recall_floor` it ships exact search (`index.below_floor: exact`, the default)
    or raises `IndexRecallError` (`refuse`)."""
    s = settings.index
    config = faiss_index.IndexConfig(
        exact_threshold=s.exact_threshold,
        kind=s.kind,
        recall_floor=s.recall_floor,
        check_queries=s.check_users,
        build_threads=s.build_threads,
        below_floor=s.below_floor,
    )
    users = data.encoded.user_ids
    rng = np.random.default_rng(settings.two_tower.seed)
    sample = users[np.sort(rng.choice(len(users), min(len(users), s.check_users), replace=False))]
    states = user_states_at(data.encoded, sample, None, fitted.tt.history_length)
    queries = encode_users(fitted.towers.user_tower, states, fitted.tt)
    index, report = faiss_index.build_checked_index(item_vecs, queries, config, k=100)
    log.info(
        "index %s: recall@%d %.4f on %d users, build %.1f s, search p99 %.2f ms",
        faiss_index.index_kind(index),
        report.k,
        report.recall_at_k,
        report.n_queries,
        report.build_seconds or 0.0,
        report.p99_ms,
    )
    return index, report, config


SEARCHABLE_SECTIONS = ("two_tower", "ranker", "collaborative", "split", "cold_start")


def settings_params(settings: TrainingSettings, fitted: FittedSystem) -> dict[str, Any]:
    """The manifest's params: every model setting (the served ones read from here)."""
    params: dict[str, Any] = {
        "two_tower_best_epoch": fitted.tower_epochs,
        "ranker_best_iteration": fitted.ranker.best_iteration,
        "ranker_groups": fitted.ranker_groups,
        "ranker_valid_ndcg@10": fitted.ranker.valid_ndcg10,
    }
    for section in SEARCHABLE_SECTIONS:
        for key, value in getattr(settings, section).model_dump().items():
            params[f"{section}.{key}"] = value
    params["two_tower.user_buckets"] = fitted.tt.user_buckets
    params["two_tower.item_buckets"] = fitted.tt.item_buckets
    return params


# --- scoring through the serving functions ---------------------------------------------------


class Served:
    """A written bundle as serving loads it, answering for users of one log through the stage
    functions of the graph (`recommend_in_process`) with the serving defaults (`RankingConfig()`)."""

    def __init__(self, bundle_dir: Path, data: Log) -> None:
        from serve_app.bundle import load_bundle
        from serve_app.recommend import ServingModel

        self.model = ServingModel.from_bundle(load_bundle(bundle_dir), "eval")
        self.data = data
        self.row_of = {str(item): row for row, item in enumerate(self.model.bundle.item_ids)}

    def lists(
        self,
        user_ids: np.ndarray,
        k: int,
        batch: int = 256,
        progress: bool = False,
        data: Log | None = None,
    ) -> np.ndarray:
        """Catalog rows [len(user_ids), k] (-1 padded) served to each user, whose `user_profile`
        row holds their state at the end of the log (no real-time events); `data` replaces the
        log the states are read from (a basket round's history with the order prefix in it)."""
        from serve_app.config import RankingConfig
        from serve_app.deployments.user_tower import feature_shapes
        from serve_app.features import assemble_user_features
        from serve_app.recommend import recommend_in_process
        from serve_app.stages.records import Query
        from training.feature_tables import user_profile_frame

        model = self.model
        data = data or self.data
        states = user_states_at(data.encoded, user_ids, None, model.history_length)
        profiles = user_profile_frame(states, model.bundle.item_ids, data.end)
        shapes = feature_shapes(model.tower)
        ranking = RankingConfig()
        out = np.full((len(user_ids), k), -1, dtype=np.int64)
        columns = ("event_count", "category_prefs", "base_embedding", "recent_items")
        starts = range(0, len(user_ids), batch)
        bar = tqdm(starts, desc="served lists", unit="batch", disable=not progress, leave=False)
        for start in bar:
            part = profiles.iloc[start : start + batch]
            users = [str(u) for u in user_ids[start : start + batch]]
            read = {c: part[c].tolist() for c in columns}
            features = assemble_user_features(
                users, read, None, shapes, model.version, degraded=False
            )
            queries = [
                Query(request_id=f"eval-{start + i}", user_id=u, k=k, model_version=model.version)
                for i, u in enumerate(users)
            ]
            seen = [tuple(s) for s in part["seen_items"]]
            results = recommend_in_process(model, queries, features, seen, ranking)
            for i, result in enumerate(results):
                rows = [self.row_of[item.item_id] for item in result.items][:k]
                out[start + i, : len(rows)] = rows
        return out


def retrieval_lists(
    fitted: FittedSystem, data: Log, user_ids: np.ndarray, k: int, progress: bool = False
) -> np.ndarray:
    """The served towers' exact top-k without seen items (the "retrieval" row of the table)."""
    states = user_states_at(data.encoded, user_ids, None, fitted.tt.history_length)
    vecs = encode_users(fitted.towers.user_tower, states, fitted.tt)
    items, _ = exact_candidates(
        vecs, fitted.towers.item_embeddings, states.seen, k, progress=progress
    )
    return items
