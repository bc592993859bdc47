"""Bench: does `recserve train` with its defaults beat tuned baselines on Online Retail, served over HTTP?

1. The raw Online Retail log (`training.online_retail`), cut at each customer's cutoff: the per-user
   rounds of `training.rounds` (#9's protocol: each customer's first purchase per product, the newest
   20% held out). The part before the cutoffs is written as a Parquet data set: what a user feeds in.
2. `recserve train` on it as a subprocess with no flags and no `RECSERVE_*` settings (its own
   validation round, settings search within the default budget, refit on everything it was given),
   then `recserve promote --force` and `recserve features all` into a private registry and store.
3. Baselines on the same split: popularity, item-kNN and EASE (neighbours and lambda tuned on the
   validation round, carved out of the same training part), scored on the held-out purchases.
4. recserve offline: `serve_app.recommend.recommend_in_process` over the registry's champion and the
   Feast reads, for every test customer; recserve over HTTP: the Ray Serve graph on that registry and
   store, POST /v1/recommendations for every test customer. Both scored the same way.

5. The within-order protocol (#32) on the same history and the same trained bundle: each customer's
   first held-out order split in two (`training.rounds.basket_round`), the first half in the cart,
   the rest relevant. Baselines tuned on its validation round see the prefix as history; recserve
   offline answers from a state with the prefix in it (`training.system.Served`, what the search
   and `recserve train`'s second table score); recserve over HTTP gets the prefix as POST /v1/events
   first (the real-time path), then POST /v1/recommendations.
6. The same within-order hold-out with the prefix in the training log (`--prefix-in-log`, on by
   default): the cut the issue first measured (0.92x EASE), where a held-out item shares an order
   with the customer's newest history. A second `recserve train`, no flags, on the history with every
   prefix in it, promoted and materialized into its own registry and store; then POST
   /v1/recommendations only (nothing sent first), on a fresh Redis so no earlier event is in the
   state. EASE and item-kNN are the within-order rows above: fit on that very log.

Prints both tables, recserve over HTTP / EASE on NDCG@10 for each (the bar: >= 1.1), the HTTP - in
process gap (identical lists expected) and the within-order events-over-HTTP / offline ratio (bar:
within 10%). Writes bench/results/online_retail_http.json.

    .venv/bin/python bench/online_retail_http.py      # ~25 min on 2 cores (two trainings)
    .venv/bin/python bench/online_retail_http.py --work-dir DIR --reuse   # serving half only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.cli import apply_ray_env  # noqa: E402

apply_ray_env()  # before Ray Serve is imported

from bench.serving_load import graph, load_served, private_redis, write_results  # noqa: E402
from serve_app.recommend import recommend_in_process  # noqa: E402
from serve_app.stages.records import Query, Recommendations  # noqa: E402
from training.data import Dataset, write_dataset  # noqa: E402
from training.evaluate import evaluate_ranking  # noqa: E402
from training.online_retail import load_online_retail  # noqa: E402
from training.pipeline import as_plain_round, baseline_lists, tune_baselines  # noqa: E402
from training.rounds import BasketRound, all_rounds  # noqa: E402
from training.system import ItemTable, Log, Served  # noqa: E402

SERVED_OFFLINE, SERVED_HTTP = "recserve, in process", "recserve, HTTP"
# Within-order: the prefix in the offline state, and the prefix sent as events before the request.
SERVED_BASKET_OFFLINE = "recserve, offline (prefix in state)"
SERVED_BASKET_HTTP = "recserve, HTTP (prefix as events)"
# Within-order with the prefix in the training log: a bundle trained on it, nothing sent first.
SERVED_IN_LOG_HTTP = "recserve, HTTP (prefix in training log)"
IN_SESSION_BAR = 0.10  # the event-driven figure within 10% of the offline one
PARITY_BAR = 0.005
TARGET_RATIO = 1.1
KEYS = ("recall@10", "recall@50", "ndcg@10", "hit_rate@10", "coverage@10", "users")


def default_data_path() -> Path:
    """$RECSERVE_SHARED_DIR/data/online-retail, else ../shared/data/online-retail next to the repo."""
    shared = Path(os.environ.get("RECSERVE_SHARED_DIR", ROOT.parent / "shared"))
    return shared / "data" / "online-retail" / "online_retail.parquet"


def recserve(*args: str, work: Path) -> None:
    """`recserve ARGS` in a subprocess without any RECSERVE_* or MLflow setting of this shell."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RECSERVE_", "MLFLOW_")) and k != "REDIS_URL"
    }
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "training", *args, "--data-dir", str(work)]
    print("$ recserve " + " ".join(args), flush=True)
    subprocess.run(command, check=True, env=env, cwd=work)


def trained(work: Path, name: str, events: pd.DataFrame, catalog: pd.DataFrame) -> float:
    """`recserve train` with no flags on `events` written as a Parquet data set under `work`, then
    promote and materialize (the embedded store): what a user runs. Returns the training seconds."""
    data_dir = work / name
    write_dataset(Dataset(name, events, catalog), data_dir)
    started = time.perf_counter()
    recserve("train", "--dataset", "parquet", "--dataset-path", str(data_dir), work=work)
    seconds = time.perf_counter() - started
    recserve("promote", "--force", work=work)
    recserve("features", "all", work=work)
    return seconds


def ranked_matrix(lists: Sequence[Sequence[str]], item_index: pd.Index, k: int) -> np.ndarray:
    """Item ids per customer -> catalog rows [U, k], -1 padded (an unknown id counts as a miss)."""
    out = np.full((len(lists), k), -1, dtype=np.int64)
    for row, items in enumerate(lists):
        codes = item_index.get_indexer(pd.Index(list(items)[:k]))
        out[row, : len(codes)] = codes
    return out


def served_in_process(
    data_dir: Path, redis_url: str, users: Sequence[str], k: int
) -> list[list[str]]:
    """The four stages in one process over the registry's champion and the Feast reads."""
    served = load_served(data_dir, redis_url)
    out: list[list[str]] = []
    batch = 64
    for start in range(0, len(users), batch):
        chunk = list(users[start : start + batch])
        read, seen = served.features.read(served.model, chunk)
        queries = [
            Query(request_id=f"offline-{start + i}", user_id=u, k=k, model_version=served.version)
            for i, u in enumerate(chunk)
        ]
        results: list[Recommendations] = recommend_in_process(
            served.model, queries, read, seen, served.settings.ranking
        )
        out.extend([item.item_id for item in r.items] for r in results)
    return out


async def served_over_http(
    url: str,
    users: Sequence[str],
    k: int,
    concurrency: int,
    events_of: Mapping[str, list[dict[str, Any]]] | None = None,
) -> tuple[list[list[str]], Counter[str], Counter[str]]:
    """POST /v1/recommendations for every user, after POSTing their `events_of` to /v1/events
    when given; (item ids per user, fallbacks, errors)."""
    import aiohttp

    lists: list[list[str]] = [[] for _ in users]
    fallbacks: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(url, timeout=timeout) as session:

        async def one(row: int, user: str) -> None:
            async with gate:
                try:
                    if events_of is not None:
                        body = {"events": events_of[user]}
                        async with session.post("/v1/events", json=body) as response:
                            if response.status != 202:
                                errors[f"events_http_{response.status}"] += 1
                                return
                    async with session.post(
                        "/v1/recommendations", json={"user_id": user, "k": k}
                    ) as response:
                        answer = await response.json()
                        if response.status != 200:
                            errors[f"http_{response.status}"] += 1
                            return
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[type(exc).__name__] += 1
                    return
                lists[row] = [item["item_id"] for item in answer["items"]]
                fallbacks[str(answer.get("fallback"))] += 1

        await asyncio.gather(*(one(row, user) for row, user in enumerate(users)))
    return lists, fallbacks, errors


def prefix_events(basket: BasketRound) -> dict[str, list[dict[str, Any]]]:
    """Each customer's order prefix as POST /v1/events bodies, in order, stamped now (the log's own
    times are years outside the accepted window)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for user, frame in basket.prefix.groupby(basket.prefix["user_id"].astype(str), sort=False):
        out[str(user)] = [
            {
                "user_id": str(user),
                "item_id": str(e.item_id),
                "event_type": str(e.event_type),
                "session_id": str(e.session_id) or None,
                "event_id": f"bench-{user}-{i}",
            }
            for i, e in enumerate(frame.itertuples(index=False))
        ]
    return out


def print_table(rows: dict[str, dict[str, float]], keys: Sequence[str]) -> None:
    print(f"\n{'system':<34}" + "".join(f"{k:>15}" for k in keys))
    for name, values in rows.items():
        cells = "".join(f"{values.get(k, float('nan')):>15.4f}" for k in keys)
        print(f"{name:<34}{cells}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--data", type=Path, default=default_data_path(), help="online_retail.parquet or .csv"
    )
    parser.add_argument("--k", type=int, default=50, help="list length requested (>= 50)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument(
        "--in-process-only", action="store_true", help="skip the HTTP half (quick model checks)"
    )
    parser.add_argument(
        "--work-dir", type=Path, help="keep the data, bundle, registry and features here"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="--work-dir already holds this bench's trained registry and features: skip training",
    )
    parser.add_argument(
        "--prefix-in-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train on the history with the order prefixes in it and score the rest of each "
        "order over HTTP (a second training, ~8 min)",
    )
    parser.add_argument(
        "--json-out", type=Path, default=ROOT / "bench/results/online_retail_http.json"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    dataset, _report = load_online_retail(args.data)
    rounds = all_rounds(dataset.events)
    validation, test = rounds.validation, rounds.test
    # The within-order protocol on the same history: the first half of each customer's first
    # held-out order arrives before the request, the rest of that order is relevant.
    basket, basket_validation = rounds.basket_test, rounds.basket_validation
    items = ItemTable.of(dataset.catalog)
    customers = test.user_ids
    relevant = test.relevant(items.index, customers)
    history = Log.of(test.history, items)
    history_users = set(history.encoded.user_ids[history.encoded.user[history.encoded.positive]])
    cold = np.array([u not in history_users for u in customers])
    b_customers = basket.user_ids
    b_relevant = basket.relevant(items.index, b_customers)
    b_history = Log.of(basket.history_with_prefix, items)
    timings["load + split"] = time.perf_counter() - start
    print(
        f"{len(test.history):,} events before the customers' cutoffs, {len(customers):,} test "
        f"customers ({int(cold.sum())} without history), {len(test.targets):,} held-out purchases;"
        f" within-order: {len(b_customers):,} customers, {len(basket.prefix):,} prefix events,"
        f" {len(basket.targets):,} held-out items of the same orders",
        flush=True,
    )

    def metrics_of(ranked: np.ndarray) -> dict[str, float]:
        return evaluate_ranking(
            ranked[:, : args.k],
            relevant,
            n_items=len(items.item_ids),
            item_categories=items.codes,
            cold_mask=cold,
            ks=(10, 50),
        )

    started = time.perf_counter()
    shrink = 10.0
    tuned = tune_baselines(validation, items, shrink)
    rows = {
        name: metrics_of(ranked)
        for name, ranked in baseline_lists(history, customers, tuned, shrink, args.k).items()
    }
    rows["EASE"]["lambda"] = float(tuned.ease_lambda or np.nan)
    rows["item-kNN"]["neighbors"] = float(tuned.knn_neighbors or 0)
    timings["baselines"] = time.perf_counter() - started
    print(
        f"EASE lambda {tuned.ease_lambda}, item-kNN neighbours {tuned.knn_neighbors} (validation)"
    )

    def b_metrics_of(ranked: np.ndarray) -> dict[str, float]:
        return evaluate_ranking(
            ranked[:, : args.k],
            b_relevant,
            n_items=len(items.item_ids),
            item_categories=items.codes,
            ks=(10, 50),
        )

    started = time.perf_counter()
    b_tuned = tune_baselines(as_plain_round(basket_validation), items, shrink)
    b_rows = {
        name: b_metrics_of(ranked)
        for name, ranked in baseline_lists(b_history, b_customers, b_tuned, shrink, args.k).items()
    }
    b_rows["EASE"]["lambda"] = float(b_tuned.ease_lambda or np.nan)
    b_rows["item-kNN"]["neighbors"] = float(b_tuned.knn_neighbors or 0)
    timings["baselines, within-order"] = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        in_log = work / "prefix-in-log"
        in_log_wanted = args.prefix_in_log and not args.in_process_only  # it is served over HTTP
        if not (args.reuse and args.work_dir):
            timings["recserve train"] = trained(
                work, "online-retail-train", test.history, dataset.catalog
            )
            if in_log_wanted:
                in_log.mkdir(parents=True, exist_ok=True)
                timings["recserve train, prefix in log"] = trained(
                    in_log, "online-retail-prefix", basket.history_with_prefix, dataset.catalog
                )
        user_ids = [str(u) for u in customers]
        item_index = pd.Index(items.item_ids)
        with private_redis() as redis_url:
            started = time.perf_counter()
            offline = served_in_process(work, redis_url, user_ids, args.k)
            timings["in process"] = time.perf_counter() - started
            rows[SERVED_OFFLINE] = metrics_of(ranked_matrix(offline, item_index, args.k))
            started = time.perf_counter()
            bundle_dir = load_served(work, redis_url).model.bundle.path
            b_offline = Served(bundle_dir, b_history).lists(b_customers, args.k)
            b_rows[SERVED_BASKET_OFFLINE] = b_metrics_of(b_offline)
            timings["within-order, offline"] = time.perf_counter() - started
            b_online: list[list[str]] = []
            online: list[list[str]] = []
            fallbacks: Counter[str] = Counter()
            errors: Counter[str] = Counter()
            if not args.in_process_only:
                with graph(work, redis_url, num_cpus=2) as url:
                    started = time.perf_counter()
                    online, fallbacks, errors = asyncio.run(
                        served_over_http(url, user_ids, args.k, args.concurrency)
                    )
                    timings["over HTTP"] = time.perf_counter() - started
                    # After the time-cutoff requests: the prefix events change these users' state.
                    started = time.perf_counter()
                    b_online, b_fallbacks, b_errors = asyncio.run(
                        served_over_http(
                            url,
                            [str(u) for u in b_customers],
                            args.k,
                            args.concurrency,
                            prefix_events(basket),
                        )
                    )
                    timings["within-order, events + HTTP"] = time.perf_counter() - started
                rows[SERVED_HTTP] = metrics_of(ranked_matrix(online, item_index, args.k))
                b_rows[SERVED_BASKET_HTTP] = b_metrics_of(
                    ranked_matrix(b_online, item_index, args.k)
                )
        in_log_errors: Counter[str] = Counter()
        in_log_fallbacks: Counter[str] = Counter()
        if in_log_wanted and (in_log / "mlflow.db").exists():
            # A fresh Redis: the prefix events POSTed above must not be in these users' state.
            with private_redis() as redis_url, graph(in_log, redis_url, num_cpus=2) as url:
                started = time.perf_counter()
                in_log_lists, in_log_fallbacks, in_log_errors = asyncio.run(
                    served_over_http(url, [str(u) for u in b_customers], args.k, args.concurrency)
                )
                timings["within-order, prefix in log, HTTP"] = time.perf_counter() - started
            b_rows[SERVED_IN_LOG_HTTP] = b_metrics_of(
                ranked_matrix(in_log_lists, item_index, args.k)
            )

    print("\nTime-cutoff protocol (each customer's newest 20% of first purchases held out)")
    print_table(rows, KEYS)
    ease = rows["EASE"]["ndcg@10"]
    served = rows.get(SERVED_HTTP, rows[SERVED_OFFLINE])
    ratio = served["ndcg@10"] / ease
    summary: dict[str, object] = {"ratio_to_ease_ndcg@10": ratio}
    print(
        f"\n{SERVED_HTTP if online else SERVED_OFFLINE} NDCG@10 / EASE: {ratio:.3f} "
        f"(bar: >= {TARGET_RATIO})"
    )
    print(
        "\nWithin-order protocol (the first half of each customer's first held-out order before"
        " the request, the rest relevant)"
    )
    print_table(b_rows, KEYS)
    b_served = b_rows.get(SERVED_BASKET_HTTP, b_rows[SERVED_BASKET_OFFLINE])
    b_ratio = b_served["ndcg@10"] / b_rows["EASE"]["ndcg@10"]
    summary["within_order_ratio_to_ease_ndcg@10"] = b_ratio
    print(
        f"\n{SERVED_BASKET_HTTP if b_online else SERVED_BASKET_OFFLINE} NDCG@10 / EASE:"
        f" {b_ratio:.3f} (bar: >= {TARGET_RATIO})"
    )
    if b_online:
        offline_ndcg = b_rows[SERVED_BASKET_OFFLINE]["ndcg@10"]
        in_session = b_rows[SERVED_BASKET_HTTP]["ndcg@10"] / offline_ndcg
        summary.update(
            {
                "in_session_over_offline_ndcg@10": in_session,
                "within_order_http_errors": dict(b_errors),
                "within_order_fallbacks": dict(b_fallbacks),
            }
        )
        print(
            f"events over HTTP / offline (prefix in state) NDCG@10: {in_session:.3f} (bar: within"
            f" {IN_SESSION_BAR:.0%}); errors: {dict(b_errors) or 0}; fallbacks: {dict(b_fallbacks)}"
        )
    if SERVED_IN_LOG_HTTP in b_rows:
        in_log_ratio = b_rows[SERVED_IN_LOG_HTTP]["ndcg@10"] / b_rows["EASE"]["ndcg@10"]
        summary.update(
            {
                "prefix_in_log_ratio_to_ease_ndcg@10": in_log_ratio,
                "prefix_in_log_http_errors": dict(in_log_errors),
                "prefix_in_log_fallbacks": dict(in_log_fallbacks),
            }
        )
        print(
            f"{SERVED_IN_LOG_HTTP} NDCG@10 / EASE (fit on the same log): {in_log_ratio:.3f} (bar:"
            f" >= {TARGET_RATIO}); errors: {dict(in_log_errors) or 0}; fallbacks:"
            f" {dict(in_log_fallbacks)}"
        )
    if online:
        identical = sum(a == b for a, b in zip(offline, online, strict=True))
        gap = rows[SERVED_HTTP]["ndcg@10"] - rows[SERVED_OFFLINE]["ndcg@10"]
        print(
            f"HTTP - in process NDCG@10: {gap:+.4f} (bar: |gap| <= {PARITY_BAR}); identical "
            f"lists: {identical}/{len(customers)}; HTTP errors: {dict(errors) or 0}; "
            f"fallbacks: {dict(fallbacks)}"
        )
        summary.update(
            {
                "ndcg@10_gap_http_minus_in_process": gap,
                "identical_lists": identical,
                "http_errors": dict(errors),
                "fallbacks": dict(fallbacks),
            }
        )
    write_results(
        args.json_out,
        "online_retail_http.py",
        argv if argv is not None else sys.argv[1:],
        {
            "customers": len(customers),
            "cold_customers": int(cold.sum()),
            "k": args.k,
            "metrics": rows,
            "within_order": {"customers": len(b_customers), "metrics": b_rows},
            **summary,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
