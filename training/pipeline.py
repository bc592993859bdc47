"""The offline pipeline: data -> features -> two-tower -> FAISS -> ranker -> evaluation -> bundle -> registry.

Time is split in three windows by global cutoffs (never randomly): the towers learn from events before
`t_rank`; the ranker learns labels from [t_rank, t_test) with features as of `t_rank`; every system is
evaluated on [t_test, end) with features as of `t_test`. The registered bundle carries item statistics
as of the end of the log, which is what serving will see.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from serve_app.contract import ITEM_FEATURE_NAMES, Collaborative
from serve_app.schemas import BundleManifest, FeatureSpec, IndexSpec
from training import index as faiss_index
from training.baselines import EASERecommender, ItemKNNRecommender, PopularityRecommender
from training.collaborative import collaborative_from, fit_collaborative, save_collaborative
from training.config import TrainingSettings
from training.data import Dataset, snapshot_id
from training.evaluate import (
    evaluate_ranking,
    print_metrics_table,
    top_k_from_scores,
    write_metrics_json,
)
from training.feature_tables import (
    user_profile_frame,
    user_profile_snapshots,
    write_user_profile_snapshots,
)
from training.features import (
    EncodedLog,
    UserStates,
    encode_log,
    first_positives,
    item_stats_at,
    training_rows,
    user_states_at,
)
from training.ranker import graded_labels, ranking_inputs, rerank, train_ranker
from training.registry import RegisteredBundle, finalize_bundle, register_bundle
from training.split import time_fraction_cutoffs
from training.two_tower import (
    encode_users,
    export_user_tower,
    item_inputs,
    position_propensity,
    train_two_tower,
)

log = logging.getLogger(__name__)

GRADES = {"click": 1.0, "add_to_cart": 2.0, "purchase": 3.0}
FINAL_SYSTEM = "retrieval+ranker"
EASE_MAX_ITEMS = 20_000


@dataclass
class PipelineResult:
    bundle_dir: Path
    manifest: BundleManifest
    metrics: dict[str, dict[str, float]]
    timings: dict[str, float] = field(default_factory=dict)
    registered: RegisteredBundle | None = None
    index_report: dict[str, float] = field(default_factory=dict)
    feature_tables: dict[str, Path] = field(default_factory=dict)


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("pipeline: %s ...", name)
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        log.info("pipeline: %s done in %.1fs", name, self.timings[name])


@dataclass(frozen=True)
class Window:
    """Users with new positive items in a time window, their states at its start, and the grades."""

    states: UserStates
    grades: sp.csr_matrix  # [B, n_items]: best grade of each new positive item in the window


def label_window(
    log_: EncodedLog,
    start: pd.Timestamp,
    end: pd.Timestamp | None,
    history_length: int,
    event_types: np.ndarray,
) -> Window:
    """States as of `start` for users with positives in [start, end) on items they had not seen."""
    in_window = (log_.ts >= start.value) & log_.positive
    if end is not None:
        in_window &= log_.ts < end.value
    idx = np.flatnonzero(in_window)
    users = np.unique(log_.user[idx])
    states = user_states_at(log_, log_.user_ids[users], start, history_length)
    return _graded_window(log_, idx, users, states, event_types)


def _graded_window(
    log_: EncodedLog,
    idx: np.ndarray,
    users: np.ndarray,
    states: UserStates,
    event_types: np.ndarray,
) -> Window:
    """The window of label events `idx` for `users` (codes, the rows of `states`): each user's best
    grade per item, items already seen dropped, users left without a label dropped."""
    row = np.full(len(log_.user_ids), -1)
    row[users] = np.arange(len(users))
    grade = np.array([GRADES.get(t, 0.0) for t in event_types[idx]], dtype=np.float32)
    grades = _max_per_cell(
        sp.coo_matrix(
            (grade, (row[log_.user[idx]], log_.item[idx])), shape=(len(users), log_.n_items)
        )
    )
    grades = grades - grades.multiply(states.seen)  # new items only
    grades.eliminate_zeros()
    keep = np.diff(grades.indptr) > 0
    kept_states = UserStates(
        states.user_ids[keep],
        states.event_count[keep],
        states.category_prefs[keep],
        states.recent_items[keep],
        states.seen[keep],
    )
    return Window(kept_states, grades[keep])


def tail_window(
    log_: EncodedLog,
    end: pd.Timestamp,
    fraction: float,
    history_length: int,
    event_types: np.ndarray,
) -> tuple[Window, EncodedLog]:
    """Labels at each user's own moment: the newest `fraction` (ceil, at least 1) of their first
    positive items before `end`, for users with at least 2 of them; states from everything they did
    before the first of those. Returns the window and the log without any label event or what
    followed it (for item statistics and collaborative models fit without the labels).
    """
    before = log_.before(end)
    first = first_positives(log_, before)
    users = log_.user[first]
    order = np.argsort(users, kind="stable")  # per user, time order kept
    first, users = first[order], users[order]
    size = np.bincount(users, minlength=len(log_.user_ids))
    start = np.searchsorted(users, users, side="left")
    from_end = size[users] - 1 - (np.arange(len(users)) - start)
    n_label = np.maximum(np.ceil(fraction * size - 1e-9), 1).astype(np.int64)
    is_label = (from_end < n_label[users]) & (size[users] >= 2)
    # The first label event's position in the log, per user (the log is in time order).
    label_start = np.full(len(log_.user_ids), len(log_.ts), dtype=np.int64)
    np.minimum.at(label_start, users[is_label], first[is_label])
    position = np.arange(len(log_.ts))
    history = before & (position < label_start[log_.user])
    labelled = np.flatnonzero(label_start < len(log_.ts))
    idx = np.flatnonzero(before & ~history & log_.positive)
    kept = log_.subset(history)
    states = user_states_at(kept, log_.user_ids[labelled], None, history_length)
    return _graded_window(log_, idx, labelled, states, event_types), kept


def _max_per_cell(m: sp.coo_matrix) -> sp.csr_matrix:
    order = np.lexsort((-m.data, m.col, m.row))
    r, c, d = m.row[order], m.col[order], m.data[order]
    first = np.ones(len(r), dtype=bool)
    first[1:] = (r[1:] != r[:-1]) | (c[1:] != c[:-1])
    return sp.csr_matrix((d[first], (r[first], c[first])), shape=m.shape)


def relevant_lists(grades: sp.csr_matrix) -> list[np.ndarray]:
    return [grades.indices[grades.indptr[i] : grades.indptr[i + 1]] for i in range(grades.shape[0])]


def history_matrix(log_: EncodedLog, cutoff: pd.Timestamp, user_ids: np.ndarray) -> sp.csr_matrix:
    """Positive-interaction weights [len(user_ids), n_items] before `cutoff`, for the CF baselines."""
    mask = log_.before(cutoff) & log_.positive
    codes = pd.Index(log_.user_ids).get_indexer(user_ids)
    row = np.full(len(log_.user_ids), -1)
    row[codes[codes >= 0]] = np.flatnonzero(codes >= 0)
    r = row[log_.user[mask]]
    sel = r >= 0
    m = sp.csr_matrix(
        (np.ones(int(sel.sum()), dtype=np.float32), (r[sel], log_.item[mask][sel])),
        shape=(len(user_ids), log_.n_items),
    )
    m.data[:] = 1.0
    return m


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


def write_feature_tables(
    directory: Path,
    log_: EncodedLog,
    states: UserStates,
    user_vecs: np.ndarray,
    item_ids: np.ndarray,
    item_features: np.ndarray,
    catalog: pd.DataFrame,
    as_of: pd.Timestamp,
) -> dict[str, Path]:
    """Write the batch feature tables Feast reads (`user_profile`, `item_profile`) as Parquet.

    One row per user / item with the state at the end of the log, stamped `as_of` (the run time, so
    that incremental materialization picks up a retrained model's rows even on unchanged data): the
    same values the bundle's offline evaluation used, so online reads match offline features.
    """
    directory.mkdir(parents=True, exist_ok=True)
    users = user_profile_frame(states, item_ids, as_of, user_vecs)
    items = pd.DataFrame(
        {
            "item_id": item_ids.astype(str),
            "event_timestamp": as_of,
            "category": catalog["category"].astype(str).to_numpy(),
            "price": catalog["price"].to_numpy(np.float64),
            **{
                name: item_features[:, j].astype(np.float32)
                for j, name in enumerate(ITEM_FEATURE_NAMES)
            },
        }
    )
    paths = {"user_profile": directory / "user_profile.parquet"}
    paths["item_profile"] = directory / "item_profile.parquet"
    users.to_parquet(paths["user_profile"], index=False)
    items.to_parquet(paths["item_profile"], index=False)
    return paths


def run_pipeline(
    settings: TrainingSettings,
    dataset: Dataset,
    *,
    progress: bool = True,
    on_table: Callable[[dict[str, dict[str, float]]], None] | None = None,
) -> PipelineResult:
    """Train, evaluate and package one bundle from `dataset`; register it when settings say so."""
    timer = _Timer()
    rk = settings.ranker
    # Hash tables sized to the data (2x distinct ids keeps collisions rare), capped by the settings.
    tt = settings.two_tower.model_copy(
        update={
            "user_buckets": min(
                settings.two_tower.user_buckets, max(1024, 2 * dataset.events["user_id"].nunique())
            ),
            "item_buckets": min(
                settings.two_tower.item_buckets, max(1024, 2 * len(dataset.catalog))
            ),
        }
    )
    torch.set_num_threads(tt.threads)
    L = tt.history_length

    with timer("encode"):
        catalog = dataset.catalog.reset_index(drop=True)
        item_ids = catalog["item_id"].to_numpy(dtype=str)
        item_index = pd.Index(item_ids)
        cat_codes, cat_names = pd.factorize(catalog["category"], sort=True)
        categories = [str(c) for c in cat_names]
        events = dataset.events
        log_ = encode_log(events, item_index, cat_codes, len(categories))
        known = item_index.get_indexer(events["item_id"]) >= 0
        event_types = events["event_type"].to_numpy()[known]
        positions = events["position"].to_numpy()[known]
        t_rank, t_test = time_fraction_cutoffs(
            events, (settings.split.ranker_fraction, settings.split.test_fraction)
        )
        t_end = pd.Timestamp(int(log_.ts.max()) + 1, tz="UTC")
        created_ns = pd.DatetimeIndex(catalog["created_at"]).asi8.astype(np.int64)
        price = catalog["price"].to_numpy(np.float64)

    with timer("two-tower"):
        rows = training_rows(log_, positions, log_.before(t_rank), L)
        valid = label_window(log_, t_rank, t_test, L, event_types)
        pre = log_.before(t_rank)
        shown = positions[pre & np.isin(event_types, ["view", "skip"])]
        clicked = positions[pre & (event_types == "click")]
        propensity = position_propensity(shown, clicked)
        items = item_inputs(catalog, cat_codes, tt)
        towers = train_two_tower(
            rows,
            items,
            len(categories),
            propensity,
            valid.states,
            relevant_lists(valid.grades),
            tt,
            progress=progress,
        )
        item_vecs = towers.item_embeddings

    with timer("index"):
        index_config = faiss_index.IndexConfig(
            exact_threshold=settings.index.exact_threshold, kind=settings.index.kind
        )
        index = faiss_index.build_index(item_vecs, index_config)
        valid_vecs = encode_users(towers.user_tower, valid.states, tt)
        sample = valid_vecs[: min(len(valid_vecs), 1000)]
        report = faiss_index.measure_index(index, item_vecs, sample, k=min(100, len(item_vecs)))

    cf = settings.collaborative
    use_cf = cf.enabled and log_.n_items <= cf.max_items
    if cf.enabled and not use_cf:
        log.warning(
            "collaborative models off: %d items exceed collaborative.max_items=%d",
            log_.n_items,
            cf.max_items,
        )

    def collaborative_at(cutoff: pd.Timestamp | None) -> Collaborative | None:
        return fit_collaborative(log_, cutoff, cf) if use_cf else None

    with timer("ranker"):
        if settings.split.ranker_labels == "window":
            # Ranker groups: users with labels in [t_rank, t_test), features as of t_rank.
            groups = valid
            stats_rank = item_stats_at(log_, t_rank, created_ns).matrix(price)
            cf_rank = collaborative_at(t_rank)
            rank_vecs = valid_vecs
        else:
            # Each user's newest items before t_test are the labels, features from what came before.
            groups, history = tail_window(
                log_, t_test, settings.split.ranker_tail_fraction, L, event_types
            )
            stats_rank = item_stats_at(history, t_test, created_ns).matrix(price)
            cf_rank = fit_collaborative(history, None, cf) if use_cf else None
            rank_vecs = encode_users(towers.user_tower, groups.states, tt)
        inputs = ranking_inputs(
            rank_vecs,
            item_vecs,
            groups.states,
            stats_rank,
            cat_codes,
            rk.candidates,
            cf_rank,
        )
        y = graded_labels(inputs.candidates, groups.grades)
        ranker = train_ranker(
            inputs.features,
            y.ravel(),
            inputs.candidates.shape[1],
            rk,
            inputs.names,
            inputs.valid,
        )
        del inputs

    with timer("evaluate"):
        test = label_window(log_, t_test, None, L, event_types)
        test_vecs = encode_users(towers.user_tower, test.states, tt)
        stats_test = item_stats_at(log_, t_test, created_ns).matrix(price)
        hist_all = history_matrix(log_, t_test, log_.user_ids)
        # The item-kNN and EASE baselines, fit once: the test window's collaborative models reuse them.
        knn: ItemKNNRecommender | None = None
        ease: EASERecommender | None = None
        if log_.n_items <= EASE_MAX_ITEMS:
            knn = ItemKNNRecommender(cf.knn_neighbors, cf.knn_shrink).fit(hist_all)
            ease = EASERecommender(lam=cf.ease_lambda, max_items=EASE_MAX_ITEMS).fit(hist_all)
        cf_test = None
        if use_cf:
            cf_test = (
                collaborative_from(ease, knn, log_, log_.before(t_test), cf)
                if ease is not None and knn is not None
                else collaborative_at(t_test)
            )
        t_inputs = ranking_inputs(
            test_vecs,
            item_vecs,
            test.states,
            stats_test,
            cat_codes,
            rk.candidates,
            cf_test,
        )
        reranked = rerank(ranker.booster, t_inputs.features, t_inputs.candidates)
        relevant = relevant_lists(test.grades)
        cold = test.states.event_count <= settings.split.cold_user_max_events
        k_max = rk.candidates
        hist_test = history_matrix(log_, t_test, test.states.user_ids)
        systems: dict[str, np.ndarray] = {}
        pop = PopularityRecommender().fit(hist_all)
        systems["popularity"] = pop.recommend(np.arange(len(relevant)), k_max, test.states.seen)
        recent = PopularityRecommender()
        recent.popularity_ = np.expm1(stats_test[:, ITEM_FEATURE_NAMES.index("log_pop_7d")])
        systems["recent popularity (7d)"] = recent.recommend(
            np.arange(len(relevant)), k_max, test.states.seen
        )
        if knn is not None and ease is not None:
            systems["item-kNN"] = _rank_history(knn, hist_test, test.states.seen, k_max)
            systems["EASE"] = _rank_history(ease, hist_test, test.states.seen, k_max)
        del ease, knn  # EASE is a dense n x n matrix
        systems["retrieval"] = t_inputs.retrieved
        systems[FINAL_SYSTEM] = reranked
        metrics = {
            name: evaluate_ranking(
                ranked,
                relevant,
                n_items=log_.n_items,
                item_categories=cat_codes,
                cold_mask=cold,
            )
            for name, ranked in systems.items()
        }
        if on_table is not None:
            on_table(metrics)

    with timer("bundle"):
        run_dir = settings.data_dir / "runs" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        bundle_dir = run_dir / "bundle"
        bundle_dir.mkdir(parents=True, exist_ok=True)
        write_metrics_json(metrics, run_dir / "metrics.json")
        stats_end = item_stats_at(log_, t_end, created_ns)
        export_user_tower(towers.user_tower, str(bundle_dir / "user_tower.pt"))
        np.save(bundle_dir / "item_ids.npy", item_ids.astype(str), allow_pickle=False)
        np.save(
            bundle_dir / "item_embeddings.npy", item_vecs.astype(np.float32), allow_pickle=False
        )
        item_features_end = stats_end.matrix(price)
        np.save(bundle_dir / "item_features.npy", item_features_end, allow_pickle=False)
        np.save(bundle_dir / "item_categories.npy", cat_codes.astype(np.int32), allow_pickle=False)
        faiss_index.save_index(index, bundle_dir / "index.faiss")
        ranker.booster.save_model(str(bundle_dir / "ranker.ubj"))
        collaborative = collaborative_at(None)
        collaborative_spec = (
            save_collaborative(collaborative, bundle_dir) if collaborative is not None else {}
        )
        pop_recent = stats_end.pop_7d + 0.01 * stats_end.pop_all
        (bundle_dir / "popularity.json").write_text(
            json.dumps(popularity_json(pop_recent, item_ids, cat_codes, categories))
        )
        flat = {k: v for k, v in metrics[FINAL_SYSTEM].items() if math.isfinite(v)}
        for system, values in metrics.items():
            flat.update({f"{system}/{k}": v for k, v in values.items() if math.isfinite(v)})
        flat["ranker_valid_ndcg@10"] = ranker.valid_ndcg10
        flat["index_recall@100"] = report.recall_at_k
        manifest = BundleManifest(
            model_name=settings.model_name,
            created_at=datetime.now(UTC),
            data_snapshot_id=snapshot_id(dataset),
            embedding_dim=tt.embedding_dim,
            num_items=len(item_ids),
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
            ranker_features=list(t_inputs.names),
            collaborative=collaborative_spec,
            item_feature_names=list(ITEM_FEATURE_NAMES),
            categories=categories,
            index=IndexSpec(
                **{
                    **faiss_index.index_spec(index, index_config),
                    "recall_at_100": report.recall_at_k,
                }
            ),
            metrics=flat,
            params={
                "dataset": dataset.name,
                "events": len(events),
                "items": len(item_ids),
                "users": len(log_.user_ids),
                "t_rank": t_rank.isoformat(),
                "t_test": t_test.isoformat(),
                "two_tower_best_epoch": towers.best_epoch,
                "ranker_best_iteration": ranker.best_iteration,
                **{f"two_tower.{k}": v for k, v in tt.model_dump().items()},
                **{f"ranker.{k}": v for k, v in rk.model_dump().items()},
                **{f"collaborative.{k}": v for k, v in cf.model_dump().items()},
                **{f"split.{k}": v for k, v in settings.split.model_dump().items()},
            },
            files={},
        )
        manifest = finalize_bundle(bundle_dir, manifest)

    with timer("feature tables"):
        # Feast's offline source: every user's state and every item's statistics at the log's end.
        states_end = user_states_at(log_, log_.user_ids, None, L)
        feature_paths = write_feature_tables(
            settings.data_dir / "features",
            log_,
            states_end,
            encode_users(towers.user_tower, states_end, tt),
            item_ids,
            item_features_end,
            catalog,
            max(t_end, pd.Timestamp.now(tz="UTC")),
        )
        # Point-in-time history for training through Feast: the states at the split cutoffs.
        write_user_profile_snapshots(
            user_profile_snapshots(
                log_,
                item_ids,
                [t_rank, t_test],
                L,
                embed=lambda st: encode_users(towers.user_tower, st, tt),
            ),
            feature_paths["user_profile"],
        )

    registered = None
    if settings.register_bundle:
        with timer("register"):
            registered = register_bundle(
                bundle_dir,
                tracking_uri=settings.tracking_uri,
                model_name=settings.model_name,
                experiment=settings.experiment,
                run_name=dataset.name,
            )
    result = PipelineResult(
        bundle_dir=bundle_dir,
        manifest=manifest,
        metrics=metrics,
        timings=timer.timings,
        registered=registered,
        index_report={
            "recall@100": report.recall_at_k,
            "p50_ms": report.p50_ms,
            "p99_ms": report.p99_ms,
        },
        feature_tables=feature_paths,
    )
    (run_dir / "timings.json").write_text(json.dumps(result.timings, indent=2))
    return result


def _rank_history(
    model: ItemKNNRecommender | EASERecommender, history: sp.csr_matrix, seen: sp.csr_matrix, k: int
) -> np.ndarray:
    scores = model.score_history(history)
    return top_k_from_scores(scores, k, seen)


def print_results(result: PipelineResult) -> None:
    print_metrics_table(result.metrics, title="Offline evaluation (test window)")
