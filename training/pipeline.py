"""The offline pipeline of `recserve train`: rounds -> settings search -> test table -> refit -> registry.

1. Per-user temporal rounds (`training.rounds`, the protocol of #9): test held out of the log,
   validation held out of test's history.
2. Settings chosen on the validation round (`training.search`, Optuna within `search.budget_seconds`),
   EASE's lambda and kNN's size for the baselines tuned there too.
3. The table printed and logged: the chosen settings fit on the test round's history
   (`training.system.fit_system`) and scored through the serving functions, beside popularity,
   item-kNN and EASE on the same split, on a seeded sample of at most `evaluation.max_users` test
   users (the table's `users` column). Nothing computed on test items feeds any choice.
4. The registered bundle: the same settings refit on the whole log (towers, collaborative models,
   ranker labels from each user's newest items), so serving knows the newest items and users. Its
   manifest says `refit: true` and keeps the validation and test figures.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from serve_app.contract import ITEM_FEATURE_NAMES
from serve_app.schemas import BundleManifest
from training.baselines import (
    EASERecommender,
    ItemKNNRecommender,
    PopularityRecommender,
    tune_ease_lambda,
)
from training.config import TrainingSettings
from training.data import Dataset, snapshot_id
from training.evaluate import evaluate_ranking, ndcg_at_k, top_k_from_scores, write_metrics_json
from training.feature_tables import (
    write_user_profiles,
)
from training.features import EncodedLog, UserStates, item_stats_at, user_states_at
from training.registry import RegisteredBundle, register_bundle
from training.rounds import BasketRound, Round, all_rounds
from training.search import SearchResult, sample_users, search_settings
from training.split import time_fraction_cutoffs
from training.system import (
    ItemTable,
    Log,
    Served,
    fit_system,
    retrieval_lists,
    write_bundle,
)
from training.two_tower import encode_users

log = logging.getLogger(__name__)

FINAL_SYSTEM = "recserve"
EASE_MAX_ITEMS = 20_000
EASE_LAMBDAS = (50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)
KNN_NEIGHBORS = (20, 50, 100, 200)
TABLE_K = 100


@dataclass
class PipelineResult:
    bundle_dir: Path
    manifest: BundleManifest
    metrics: dict[str, dict[str, float]]  # the test round's table
    # The within-order test round's table (`training.rounds.basket_round`): empty without orders.
    basket_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # The process's peak resident memory (MiB) when each phase ended: a high-water mark, so a phase
    # whose figure is above the one before it set the peak (bench/scale.py reads these).
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    registered: RegisteredBundle | None = None
    index_report: dict[str, float] = field(default_factory=dict)
    feature_tables: dict[str, Path] = field(default_factory=dict)
    search: SearchResult | None = None
    settings: TrainingSettings | None = None  # the chosen settings the bundle was refit with


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("pipeline: %s ...", name)
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        self.peak_rss_mb[name] = peak_rss_mb()
        log.info(
            "pipeline: %s done in %.1fs (peak RSS %.0f MiB)",
            name,
            self.timings[name],
            self.peak_rss_mb[name],
        )


def relevant_min_weight(dataset: Dataset) -> float | None:
    """A ratings log (MovieLens) counts held-out ratings >= 4 as relevant; other logs all."""
    if dataset.name.startswith("movielens"):
        from training.movielens import RELEVANT_MIN_WEIGHT

        return RELEVANT_MIN_WEIGHT
    return None


def round_matrix(data: Log, user_ids: np.ndarray) -> sp.csr_matrix:
    """0/1 positive interactions [len(user_ids), n_items] in a round's history (the baselines')."""
    e = data.encoded
    codes = pd.Index(e.user_ids).get_indexer(user_ids)
    row = np.full(len(e.user_ids), -1)
    row[codes[codes >= 0]] = np.flatnonzero(codes >= 0)
    r = row[e.user[e.positive]]
    sel = r >= 0
    m = sp.csr_matrix(
        (np.ones(int(sel.sum()), dtype=np.float32), (r[sel], e.item[e.positive][sel])),
        shape=(len(user_ids), e.n_items),
    )
    m.data[:] = 1.0
    return m


@dataclass(frozen=True)
class Baselines:
    """EASE's lambda and item-kNN's size, tuned on the validation round."""

    ease_lambda: float | None
    knn_neighbors: int | None
    validation: dict[str, float]


def tune_baselines(validation: Round, items: ItemTable, knn_shrink: float) -> Baselines:
    """Grid-tune EASE lambda and kNN neighbours by validation NDCG@10 (skipped on large catalogs)."""
    if len(items.item_ids) > EASE_MAX_ITEMS:
        return Baselines(None, None, {})
    data = Log.of(validation.history, items)
    everyone = data.encoded.user_ids
    history = round_matrix(data, everyone)
    users = validation.user_ids
    relevant = validation.relevant(items.index, users)
    rows = pd.Index(everyone).get_indexer(users)
    known = rows >= 0
    targets = [np.zeros(0, np.int64)] * len(everyone)
    for r, rel in zip(rows, relevant, strict=True):
        if r >= 0:  # a user with no event in the history is cold: no baseline scores them
            targets[r] = rel
    lam, ease_scores = tune_ease_lambda(history, targets, EASE_LAMBDAS, 10)
    knn_scores = {}
    warm = rows[known]
    for n in KNN_NEIGHBORS:
        knn = ItemKNNRecommender(n, knn_shrink).fit(history)
        ranked = top_k_from_scores(knn.score_history(history[warm]), 10, history[warm])
        knn_scores[n] = ndcg_at_k(ranked, [targets[r] for r in warm], 10)
    best_n = max(knn_scores, key=lambda n: knn_scores[n])
    return Baselines(
        lam,
        best_n,
        {"EASE": ease_scores[lam], "item-kNN": knn_scores[best_n]},
    )


def baseline_lists(
    data: Log, user_ids: np.ndarray, baselines: Baselines, knn_shrink: float, k: int
) -> dict[str, np.ndarray]:
    """Popularity, item-kNN and EASE top-k over the round's history, seen items excluded; a user
    without history gets the popularity list from every baseline (#9: the cold-start path)."""
    history_all = round_matrix(data, data.encoded.user_ids)
    history = round_matrix(data, user_ids)
    popular = (
        PopularityRecommender().fit(history_all).recommend(np.arange(len(user_ids)), k, history)
    )
    out = {"popularity": popular}
    if baselines.ease_lambda is not None and baselines.knn_neighbors is not None:
        cold = np.diff(history.indptr) == 0
        knn = ItemKNNRecommender(baselines.knn_neighbors, knn_shrink).fit(history_all)
        ease = EASERecommender(lam=baselines.ease_lambda, max_items=EASE_MAX_ITEMS)
        ease.fit(history_all)
        for name, model in (("item-kNN", knn), ("EASE", ease)):
            ranked = top_k_from_scores(model.score_history(history), k, history)
            ranked[cold] = popular[cold]
            out[name] = ranked
    return out


def run_pipeline(
    settings: TrainingSettings,
    dataset: Dataset,
    *,
    progress: bool = True,
    on_table: Callable[[dict[str, dict[str, float]]], None] | None = None,
    on_basket_table: Callable[[dict[str, dict[str, float]]], None] | None = None,
    on_trial: Callable[[str], None] | None = None,
) -> PipelineResult:
    """Choose settings, report them on the test round, refit on everything, register (see module)."""
    timer = _Timer()
    items = ItemTable.of(dataset.catalog)
    run_dir = settings.data_dir / "runs" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    shrink = settings.collaborative.knn_shrink

    with timer("rounds"):
        # The time-cutoff rounds and, beside them, the within-order ones on the same histories.
        rounds = all_rounds(
            dataset.events, settings.split.holdout_fraction, relevant_min_weight(dataset)
        )
        validation, test = rounds.validation, rounds.test
        basket_validation, basket_test = rounds.basket_validation, rounds.basket_test
    with timer("baselines (validation)"):
        baselines = tune_baselines(validation, items, shrink)
    with timer("search"), _trial_runs(settings, dataset.name) as log_trial:
        search = search_settings(
            settings,
            validation,
            items,
            basket=basket_validation if len(basket_validation.user_ids) else None,
            log_trial=log_trial,
            progress=on_trial or (lambda line: log.info("search: %s", line)),
        )
        chosen = search.settings

    with timer("test round"):
        data = Log.of(test.history, items)
        fitted = fit_system(chosen, data, items, progress=progress)
        test_dir = run_dir / "test_round_bundle"
        write_bundle(test_dir, chosen, fitted, data, items, snapshot="test-round")
        users = sample_users(test.user_ids, settings.evaluation.max_users, settings.evaluation.seed)
        metrics = round_table(
            test, data, users, items, fitted, test_dir, baselines, shrink, progress
        )
        if on_table is not None:
            on_table(metrics)
        # EASE and item-kNN tuned on the within-order validation round when it has users.
        basket_baselines = (
            tune_baselines(as_plain_round(basket_validation), items, shrink)
            if len(basket_test.user_ids) and len(basket_validation.user_ids)
            else baselines
        )
        # Every system answers with the order prefix in the state, as the real-time path serves a
        # shopper whose first items arrived as events after the bundle was trained (the test-round
        # bundle is not refit on the prefixes).
        basket_metrics: dict[str, dict[str, float]] = {}
        if len(basket_test.user_ids):
            basket_metrics = round_table(
                basket_test,
                Log.of(basket_test.history_with_prefix, items),
                sample_users(
                    basket_test.user_ids, settings.evaluation.max_users, settings.evaluation.seed
                ),
                items,
                fitted,
                test_dir,
                basket_baselines,
                shrink,
                progress,
            )
            if on_basket_table is not None:
                on_basket_table(basket_metrics)

    with timer("refit"):
        everything = Log.of(dataset.events, items)
        refit = fit_system(chosen, everything, items, progress=progress)

    with timer("bundle"):
        bundle_dir = run_dir / "bundle"
        write_metrics_json(metrics, run_dir / "metrics.json")
        flat = {k: v for k, v in metrics[FINAL_SYSTEM].items() if math.isfinite(v)}
        for system, values in metrics.items():
            flat.update({f"{system}/{k}": v for k, v in values.items() if math.isfinite(v)})
        for system, values in basket_metrics.items():
            flat.update({f"basket/{system}/{k}": v for k, v in values.items() if math.isfinite(v)})
        for name, value in search.best_by_round.items():
            flat[f"validation/{name}/ndcg@10"] = value
        if math.isfinite(search.best_ndcg10):
            flat["validation/ndcg@10"] = search.best_ndcg10
            flat["validation/given_settings_ndcg@10"] = search.given_ndcg10
        for system, value in baselines.validation.items():
            flat[f"validation/{system}/ndcg@10"] = value
        params: dict[str, Any] = {
            "dataset": dataset.name,
            "events": len(dataset.events),
            "items": len(items.item_ids),
            "users": len(everything.encoded.user_ids),
            "refit": True,
            "rounds.holdout_fraction": settings.split.holdout_fraction,
            "rounds.validation_users": len(validation.user_ids),
            "rounds.test_users": len(test.user_ids),
            "rounds.basket_validation_users": len(basket_validation.user_ids),
            "rounds.basket_test_users": len(basket_test.user_ids),
            "evaluation.users": len(users),
            "baselines.ease_lambda": baselines.ease_lambda,
            "baselines.knn_neighbors": baselines.knn_neighbors,
            **search.summary(),
        }
        manifest = write_bundle(
            bundle_dir,
            chosen,
            refit,
            everything,
            items,
            snapshot=snapshot_id(dataset),
            metrics=flat,
            params=params,
        )

    with timer("feature tables"):
        # Feast's offline source: every user's state and every item's statistics at the log's end,
        # and for training through Feast the states at two time quantiles, a chunk of users at a time.
        stats_end = item_stats_at(everything.encoded, everything.end, items.created_ns)
        feature_paths = write_feature_tables(
            settings.data_dir / "features",
            everything.encoded,
            items.item_ids,
            stats_end.matrix(items.price),
            items.frame,
            max(everything.end, pd.Timestamp.now(tz="UTC")),
            refit.tt.history_length,
            embed=lambda st: encode_users(refit.towers.user_tower, st, refit.tt),
            snapshot_times=time_fraction_cutoffs(everything.events, (0.75, 0.9)),
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
        basket_metrics=basket_metrics,
        timings=timer.timings,
        peak_rss_mb=timer.peak_rss_mb,
        registered=registered,
        index_report={"recall@100": float(manifest.index.recall_at_100 or 0.0)},
        feature_tables=feature_paths,
        search=search,
        settings=chosen,
    )
    (run_dir / "timings.json").write_text(json.dumps(result.timings, indent=2))
    return result


def as_plain_round(basket: BasketRound) -> Round:
    """A within-order round as the baselines see it: the prefix is part of the history."""
    return Round(basket.name, basket.history_with_prefix, basket.targets)


def round_table(
    round_: Round,
    data: Log,
    users: np.ndarray,
    items: ItemTable,
    fitted: Any,
    bundle_dir: Path,
    baselines: Baselines,
    shrink: float,
    progress: bool,
) -> dict[str, dict[str, float]]:
    """One round's table: the baselines, the towers' retrieval and recserve (the bundle in
    `bundle_dir`, served) answer `users` from their states in `data`, scored on the round's items."""
    log.info("%s round: scoring %d of %d users", round_.name, len(users), len(round_.user_ids))
    relevant = round_.relevant(items.index, users)
    cold = user_states_at(data.encoded, users, None, 1).event_count == 0
    systems = baseline_lists(data, users, baselines, shrink, TABLE_K)
    systems["retrieval"] = retrieval_lists(fitted, data, users, TABLE_K, progress)
    systems[FINAL_SYSTEM] = Served(bundle_dir, data).lists(users, TABLE_K, progress=progress)
    return {
        name: evaluate_ranking(
            ranked,
            relevant,
            n_items=len(items.item_ids),
            item_categories=items.codes,
            cold_mask=cold,
        )
        for name, ranked in systems.items()
    }


@contextmanager
def _trial_runs(
    settings: TrainingSettings, run_name: str
) -> Iterator[Callable[[int, dict[str, Any], dict[str, float], str], None]]:
    """One nested MLflow run per trial under a parent `search-<data set>` run (opened lazily, in
    the experiment `<experiment>-search`, so the registry's runs stay one per bundle). Through an
    `MlflowClient`: the fluent API would set MLFLOW_TRACKING_URI for the whole process."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(settings.tracking_uri)
    parent: list[str] = []

    def log_trial(
        number: int, params: dict[str, Any], metrics: dict[str, float], status: str
    ) -> None:
        if not parent:
            name = f"{settings.experiment}-search"
            found = client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else client.create_experiment(name)
            parent.append(client.create_run(experiment, run_name=f"search-{run_name}").info.run_id)
        run = client.create_run(
            client.get_run(parent[0]).info.experiment_id,
            run_name=f"trial-{number}",
            tags={"mlflow.parentRunId": parent[0], "optuna.state": status},
        )
        now = int(time.time() * 1000)
        client.log_batch(
            run.info.run_id,
            metrics=[
                Metric(k.replace("@", "_at_"), v, now, 0)
                for k, v in metrics.items()
                if math.isfinite(v)
            ],
            params=[Param(k, str(v)) for k, v in params.items()],
            tags=[RunTag("optuna.trial", str(number))],
        )
        client.set_terminated(run.info.run_id, "FINISHED" if status == "COMPLETE" else "KILLED")

    try:
        yield log_trial
    finally:
        if parent:
            client.set_terminated(parent[0])


def write_feature_tables(
    directory: Path,
    log_: EncodedLog,
    item_ids: np.ndarray,
    item_features: np.ndarray,
    catalog: pd.DataFrame,
    as_of: pd.Timestamp,
    history_length: int,
    embed: Callable[[UserStates], np.ndarray] | None = None,
    snapshot_times: Sequence[pd.Timestamp] = (),
) -> dict[str, Path]:
    """Write the batch feature tables Feast reads (`user_profile`, `item_profile`) as Parquet.

    One row per user / item with the state at the end of the log, stamped `as_of` (the run time, so
    that incremental materialization picks up a retrained model's rows even on unchanged data): the
    same values the bundle's offline evaluation used, so online reads match offline features. The
    user rows are built a chunk of users at a time (`training.feature_tables.write_user_profiles`,
    with the point-in-time snapshots at `snapshot_times`), so a million users fit.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"user_profile": directory / "user_profile.parquet"}
    paths["item_profile"] = directory / "item_profile.parquet"
    write_user_profiles(
        paths["user_profile"], log_, item_ids, history_length, as_of, snapshot_times, embed
    )
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
    items.to_parquet(paths["item_profile"], index=False)
    return paths


def print_results(result: PipelineResult) -> None:
    from training.evaluate import print_metrics_table

    print_metrics_table(result.metrics, title="Offline evaluation (test round)")
