"""Does recserve work at this catalog size on this node? Generate, train, index, materialize, serve, browse.

One run per named size (`training.config.SIZES`: tiny, default, large, xl), each step as a user runs it:
1. generate: `recserve generate --size S` (a child process: wall time and its peak RSS);
2. train: `recserve train --dataset parquet --promote --phases-json` on that data (time and the child's
   peak RSS; per phase, the seconds and the process's peak RSS when the phase ended; the test round's
   table), then the bundle's size on disk and its manifest's index recall@100 vs exact;
3. index: the index build time (the manifest's when it records one, else the shipped index rebuilt
   from the bundle's embeddings with its manifest parameters on --index-threads threads) and the
   shipped index searched on one thread with 1,000 users' served base vectors (p50/p99, recall again);
4. materialize: `recserve features all` into a private redis-server (a temp dir, a free port: the
   shared Redis is untouched), its time, peak RSS and Redis memory;
5. serve: the graph (`bench.serving_load.graph`, the placement and deployments of serve_config.yaml;
   `--placement` picks another grouping of the stages, its figures kept under '<size>+<placement>')
   reading those features from Redis: time to ready, resident memory per stage replica
   (`bench.replica_memory.replica_rss_mb`), then open-loop load (`bench.serving_load.open_loop`) at
   25, 50 and 100 requests/s: p50/p99 and errors (50/s for --duration, 5 minutes by default);
6. search: the demo page's catalog search (`GET /v1/demo/catalog?q=`) at --search-rate while the
   recommendations run at 50/s: search p50/p99 and errors, and the recommendations' p99 beside it.
serve and search need the features in the private Redis, so either brings materialize with it.

Prints one table (figure, value, the issue's bar for this size, pass/fail: bench/scale_report.py)
and writes bench/results/scale.json keyed by size (a run of some steps replaces those steps' figures
only), with the command line and the machine (cores, memory). Ray and every child started here stop at the end,
on Ctrl-C and on errors. Outside CI (#27); the tests exercise the same code paths at small sizes.

    python bench/scale.py --size tiny --budget 0 --duration 20 --sweep-duration 10    # a smoke run
    python bench/scale.py --size xl --data-dir /data/scale-xl                         # the acceptance
    python bench/scale.py --size xl --data-dir /data/scale-xl --skip-generate --steps serve,search
    python bench/scale.py --size xl --data-dir /data/scale-xl --steps serve,search \
        --redis-url redis://127.0.0.1:6390/0 --placement fused      # features already there
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scale_report import (  # noqa: E402
    ACCEPTANCE_RATE,
    RATES,
    STEPS,
    merge_results,
    print_table,
    strongest_baseline,
)
from training.config import SIZES  # noqa: E402

RESULTS = ROOT / "bench/results/scale.json"


def machine() -> dict[str, Any]:
    import psutil

    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }


# --- running children ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildRun:
    seconds: float
    peak_rss_mb: float


def run_child(command: Sequence[str], env: dict[str, str], what: str) -> ChildRun:
    """Run `command` with its output on this terminal; its wall time and peak RSS (wait4). On an
    interrupt or error here, the child is stopped too."""
    print(f"[scale] $ {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:
        stop_child(process)
        raise
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if process.returncode != 0:
        raise SystemExit(f"{what} failed (exit {process.returncode}): {shlex.join(command)}")
    return ChildRun(round(seconds, 2), round(usage.ru_maxrss / 1024, 1))


def stop_child(process: subprocess.Popen[bytes]) -> None:
    """SIGINT (a clean stop), then SIGTERM, then SIGKILL."""
    for send, grace in ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        if process.poll() is not None:
            return
        with suppress(ProcessLookupError):
            process.send_signal(send)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)


def child_env(redis_url: str | None = None) -> dict[str, str]:
    """This checkout on the path; REDIS_URL only where given (never the shared one by accident)."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RECSERVE_REDIS_URL")}
    env["PYTHONPATH"] = str(ROOT)
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def recserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "training.cli", *args]


def dataset_dir(data_dir: Path, size: str) -> Path:
    """Where the generate step writes the data set of `size` (and --skip-generate finds it)."""
    return data_dir / "datasets" / f"synthetic-{size}"


def directory_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


# --- the steps -----------------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    data_dir: Path
    state: Path  # this bench's files in the data dir (the train step's phases JSON)
    redis_url: str | None = None


def step_generate(ctx: Context) -> dict[str, Any]:
    out = dataset_dir(ctx.data_dir, ctx.args.size)
    run = run_child(
        recserve("generate", "--size", ctx.args.size, "--out", str(out)),
        child_env(),
        "generate",
    )
    return {
        "dataset_dir": str(out),
        "dataset_mb": directory_mb(out),
        "figures": {"generate_s": run.seconds, "generate_peak_rss_mb": run.peak_rss_mb},
    }


def step_train(ctx: Context) -> dict[str, Any]:
    data = dataset_dir(ctx.data_dir, ctx.args.size)
    if not (data / "events.parquet").exists():
        raise SystemExit(f"no generated data in {data}: run the generate step first")
    phases_path = ctx.state / "train_phases.json"
    phases_path.unlink(missing_ok=True)
    command = recserve(
        "train",
        "--dataset",
        "parquet",
        "--dataset-path",
        str(data),
        "--data-dir",
        str(ctx.data_dir),
        "--promote",
        "--phases-json",
        str(phases_path),
    )
    if ctx.args.budget is not None:
        command += ["--budget", str(ctx.args.budget)]
    run = run_child(command, child_env(), "train")
    phases = json.loads(phases_path.read_text())
    version = phases["registered_version"]
    if version is not None and not phases["promoted"]:
        # The serve step serves the champion: make it the bundle just measured.
        run_child(
            recserve("promote", "--data-dir", str(ctx.data_dir), "--version", version, "--force"),
            child_env(),
            "promote",
        )
    metrics = phases["metrics"]
    figures: dict[str, Any] = {
        "train_s": run.seconds,
        "train_peak_rss_mb": run.peak_rss_mb,
        "ndcg10_recserve": metrics["recserve"]["ndcg@10"],
        "ndcg10_popularity": metrics.get("popularity", {}).get("ndcg@10"),
        "bundle_mb": directory_mb(Path(phases["bundle_dir"])),
        "index_recall100": phases["index"].get("recall_at_100"),
    }
    best = strongest_baseline(metrics)
    if best is not None:
        figures["ndcg10_best_baseline"] = best[1]
    return {
        "command": shlex.join(command),
        "phases": phases["phases"],
        "pipeline_seconds": phases["seconds"],
        "strongest_baseline": best[0] if best else None,
        "metrics": metrics,
        "bundle_dir": phases["bundle_dir"],
        "model_version": version,
        "index": phases["index"],
        "figures": figures,
    }


def trained_bundle(ctx: Context) -> Path:
    phases_path = ctx.state / "train_phases.json"
    if not phases_path.exists():
        raise SystemExit(f"no {phases_path}: run the train step first")
    return Path(json.loads(phases_path.read_text())["bundle_dir"])


def served_user_vectors(data_dir: Path, n: int, seed: int = 0) -> Any:
    """Up to `n` users' base vectors from the feature table (what the UserTower serves them)."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(
        data_dir / "features" / "user_profile.parquet", columns=["base_embedding"]
    )
    rng = np.random.default_rng(seed)
    rows = rng.choice(table.num_rows, size=min(n, table.num_rows), replace=False)
    vectors = [v for v in table.column(0).take(np.sort(rows)).to_pylist() if v]
    return np.asarray(vectors, dtype=np.float32)


def step_index(ctx: Context) -> dict[str, Any]:
    """Build time (the manifest's, else a rebuild with its parameters) and one-thread search."""
    import faiss
    import numpy as np

    from training import index as faiss_index

    bundle = trained_bundle(ctx)
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = manifest["index"]
    params = spec.get("params", {})
    embeddings = np.load(bundle / "item_embeddings.npy", mmap_mode="r")
    # The build records its time in the manifest's index entry (training.index.build_checked_index).
    recorded = spec.get("build_seconds", params.get("build_seconds"))
    if recorded is not None:
        build_s, source = float(recorded), "manifest"
    else:
        config = faiss_index.IndexConfig(
            exact_threshold=int(params.get("exact_threshold", 50_000)),
            kind=spec["type"] if spec["type"] in ("hnsw", "ivf", "ivf_pq") else "hnsw",
            hnsw_m=int(params.get("m", 32)),
            hnsw_ef_construction=int(params.get("ef_construction", 200)),
            hnsw_ef_search=int(params.get("ef_search", 256)),
            ivf_nlist=int(params["nlist"]) if "nlist" in params else None,
            ivf_nprobe=int(params.get("nprobe", 64)),
            ivf_pq_k_factor=float(params.get("k_factor", 4.0)),
            ivf_pq_m=int(params["pq_m"]) if "pq_m" in params else None,
            threads=ctx.args.index_threads,
        )
        print(
            f"[scale] rebuilding the {spec['type']} index of {len(embeddings):,} items", flush=True
        )
        start = time.perf_counter()
        rebuilt = faiss_index.build_index(np.asarray(embeddings), config)
        build_s, source = time.perf_counter() - start, f"rebuilt, {ctx.args.index_threads} threads"
        if faiss_index.index_kind(rebuilt) != spec["type"]:
            raise SystemExit(
                f"rebuilt a {faiss_index.index_kind(rebuilt)} index, not {spec['type']}"
            )
        del rebuilt
    from serve_app.bundle import load_index as load_served_index
    from serve_app.schemas import BundleManifest
    from serve_app.stages.retriever import touch_mapped_vectors

    # As a Retriever replica loads it (memory-mapped, the manifest's search parameters) and warms
    # it (its vectors faulted in) before it takes requests.
    shipped = load_served_index(bundle, BundleManifest.model_validate(manifest))
    touch_mapped_vectors(shipped)
    faiss.omp_set_num_threads(1)  # as a Retriever replica searches
    queries = served_user_vectors(ctx.data_dir, ctx.args.index_queries)
    report = faiss_index.measure_index(
        shipped, np.asarray(embeddings), queries, k=min(100, len(embeddings))
    )
    return {
        "index_type": spec["type"],
        "params": params,
        "build_source": source,
        "queries": report.n_queries,
        "figures": {
            "index_build_s": round(build_s, 2),
            "search_recall100": round(report.recall_at_k, 4),
            "search_p50_ms": round(report.p50_ms, 3),
            "search_p99_ms": round(report.p99_ms, 3),
        },
    }


def step_materialize(ctx: Context) -> dict[str, Any]:
    import redis

    assert ctx.redis_url is not None
    if not (ctx.data_dir / "features" / "user_profile.parquet").exists():
        raise SystemExit(f"no feature tables in {ctx.data_dir}/features: run the train step first")
    # The private Redis is new every run, but Feast's file registry remembers what an earlier run
    # materialized (into its own, gone, Redis) and would load nothing: start it afresh.
    (ctx.data_dir / "feast" / "registry.db").unlink(missing_ok=True)
    run = run_child(
        recserve("features", "all", "--data-dir", str(ctx.data_dir)),
        child_env(ctx.redis_url),
        "materialize",
    )
    info = redis.Redis.from_url(ctx.redis_url).info("memory")
    return {
        "redis_keys": int(redis.Redis.from_url(ctx.redis_url).dbsize()),
        "figures": {
            "materialize_s": run.seconds,
            "materialize_peak_rss_mb": run.peak_rss_mb,
            "redis_used_mb": round(int(info["used_memory"]) / 2**20, 1),
        },
    }


def serving_settings(data_dir: Path, redis_url: str) -> dict[str, Any]:
    """The graph's settings: the features materialized into the private Redis (redis profile)."""
    return {
        "feature_store": {"data_dir": str(data_dir), "profile": "redis", "redis_url": redis_url},
        "redis_url": redis_url,
    }


@contextmanager
def reaped() -> Iterator[Callable[[], None]]:
    """Yield `snapshot()`, to be called while Ray runs; on exit, stop every process it listed that
    outlived Ray's shutdown (Ray's agents and Serve's HAProxy can), whatever ended the block."""
    import psutil

    from serve_app.cli import reap

    family: list[Any] = []

    def snapshot() -> None:
        family.clear()
        for process in psutil.Process().children(recursive=True):
            with suppress(psutil.NoSuchProcess):
                if process.name() != "redis-server":  # this run's Redis: stopped by its owner
                    family.append(process)

    try:
        yield snapshot
    finally:
        reap(family, 3.0)


def rate_duration(args: argparse.Namespace, rate: float) -> float:
    return float(args.duration if rate == ACCEPTANCE_RATE else args.sweep_duration)


def step_serve(ctx: Context, url: str, users: list[str], ready_s: float) -> dict[str, Any]:
    from bench.replica_memory import replica_memory
    from bench.serving_load import open_loop

    args = ctx.args
    print(f"[scale] warm-up: {args.warmup:.0f} s at {RATES[0]:.0f}/s", flush=True)
    asyncio.run(open_loop(url, RATES[0], args.warmup, args.max_requests, users, args.k))
    # Per replica RSS and PSS (a page shared by several processes, the memory-mapped bundle's, is
    # counted once in the PSS sum): `bench.replica_memory.replica_memory`.
    memory = {name: m for name, m in replica_memory(os.getpid()).items() if m.get("rss")}
    figures: dict[str, Any] = {"graph_ready_s": round(ready_s, 1)}
    hosts = stage_hosts(placement_of(args))
    for name in hosts:
        figures[f"rss_mb_{name}"] = memory.get(name, {}).get("rss")
        figures[f"pss_mb_{name}"] = memory.get(name, {}).get("pss")
    figures["stage_replicas_mb"] = round(sum(memory.get(n, {}).get("rss", 0.0) for n in hosts), 1)
    figures["stage_replicas_pss_mb"] = round(
        sum(memory.get(n, {}).get("pss", 0.0) for n in hosts), 1
    )
    breakdown = stage_timings(url, users[:200], args.k)
    print(f"[scale] one request at a time, median ms: {breakdown}", flush=True)
    runs = []
    for rate in RATES:
        duration = rate_duration(args, rate)
        print(f"[scale] {rate:.0f} requests/s for {duration:.0f} s", flush=True)
        result = asyncio.run(open_loop(url, rate, duration, args.max_requests, users, args.k))
        runs.append(asdict(result))
        figures[f"p50_ms_{rate:.0f}"] = result.latency_ms["p50"]
        figures[f"p99_ms_{rate:.0f}"] = result.latency_ms["p99"]
        figures[f"errors_{rate:.0f}"] = result.sent - result.ok  # every other answer is one
        print(
            f"[scale]   ok {result.ok}/{result.sent} p50 {result.latency_ms['p50']} ms "
            f"p99 {result.latency_ms['p99']} ms errors {result.errors}",
            flush=True,
        )
    return {
        "placement": placement_of(args),
        "stage_hosts": list(hosts),
        "serial_timings_ms": breakdown,
        "replica_rss_mb": memory,
        "runs": runs,
        "figures": figures,
    }


def stage_timings(url: str, users: Sequence[str], k: int) -> dict[str, float]:
    """Medians of `?debug=1` timings over requests sent one at a time (no queueing): each stage's
    own time, the Ingress's total, and the client's round trip; where a request's time goes."""
    import statistics

    import httpx

    samples: dict[str, list[float]] = {}
    with httpx.Client(base_url=url, timeout=10) as client:
        for user in users:
            start = time.perf_counter()
            response = client.post(
                "/v1/recommendations", params={"debug": "1"}, json={"user_id": user, "k": k}
            )
            round_trip = (time.perf_counter() - start) * 1000
            if response.status_code != 200:
                continue
            debug = response.json().get("debug") or {}
            for name, ms in {
                **debug.get("timings_ms", {}),
                "ingress_total": debug.get("ingress_total_ms"),
                "client_round_trip": round_trip,
            }.items():
                if isinstance(ms, int | float):
                    samples.setdefault(name, []).append(float(ms))
    return {name: round(statistics.median(v), 2) for name, v in samples.items()}


def placement_of(args: argparse.Namespace) -> str:
    return str(args.placement or os.environ.get("RECSERVE_PLACEMENT") or "split")


def stage_hosts(placement: str) -> tuple[str, ...]:
    """The deployments whose replicas hold the stages: each group's, the Ingress for a group
    it hosts itself (`fused`: it holds the whole chain, and the HTTP edge and demo catalog too)."""
    from serve_app.placement import resolve_placement

    groups = resolve_placement(placement)
    return tuple("Ingress" if g.in_ingress else g.name for g in groups)


def results_key(args: argparse.Namespace) -> str:
    """Where this run's figures go in scale.json: the size, or '<size>+<placement>' when the graph
    is not split (the chart's default), so each placement keeps its own table."""
    placement = placement_of(args)
    return args.size if placement == "split" else f"{args.size}+{placement}"


def search_terms(data_dir: Path, size: str, n: int, seed: int = 0) -> list[str]:
    """Words of random catalog titles (what a user types into the demo's search box)."""
    import numpy as np
    import pyarrow.parquet as pq

    titles = pq.read_table(dataset_dir(data_dir, size) / "catalog.parquet", columns=["title"])
    rng = np.random.default_rng(seed)
    rows = rng.choice(titles.num_rows, size=min(n, titles.num_rows), replace=False)
    terms = []
    for title in titles.column(0).take(np.sort(rows)).to_pylist():
        words = [w for w in str(title).split() if len(w) >= 3] or [str(title)[:8]]
        terms.append(words[int(rng.integers(len(words)))][:64])
    return terms


async def catalog_searches(
    url: str, rate: float, duration: float, terms: Sequence[str]
) -> tuple[list[float], dict[str, int]]:
    """Open-loop `GET /v1/demo/catalog?q=` at `rate`: latencies (ms) of the 200s, errors by kind."""
    import aiohttp

    from bench.serving_load import send_on_schedule

    latencies: list[float] = []
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(url, timeout=timeout) as session:

        async def one(i: int, scheduled: float) -> None:
            params = {"q": terms[i % len(terms)], "limit": "60"}
            try:
                async with session.get("/v1/demo/catalog", params=params) as response:
                    await response.read()
                    if response.status != 200:
                        key = f"http_{response.status}"
                        errors[key] = errors.get(key, 0) + 1
                        return
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            latencies.append((loop.time() - scheduled) * 1000)

        await send_on_schedule(rate, max(1, int(rate * duration)), one)
    return latencies, errors


def step_search(ctx: Context, url: str, users: list[str]) -> dict[str, Any]:
    from bench.serving_load import open_loop, percentiles

    args = ctx.args
    terms = search_terms(ctx.data_dir, args.size, 500)
    print(
        f"[scale] catalog search at {args.search_rate:.0f}/s with recommendations at "
        f"{ACCEPTANCE_RATE:.0f}/s for {args.search_duration:.0f} s",
        flush=True,
    )

    async def both() -> tuple[Any, tuple[list[float], dict[str, int]]]:
        return await asyncio.gather(
            open_loop(url, ACCEPTANCE_RATE, args.search_duration, args.max_requests, users, args.k),
            catalog_searches(url, args.search_rate, args.search_duration, terms),
        )

    recs, (latencies, errors) = asyncio.run(both())
    search = percentiles(latencies)
    sent = max(1, int(args.search_rate * args.search_duration))
    figures = {
        "demo_search_p50_ms": search["p50"],
        "demo_search_p99_ms": search["p99"],
        "demo_search_errors": sent - len(latencies),
        "p99_ms_with_search": recs.latency_ms["p99"],
        "errors_with_search": recs.sent - recs.ok,
    }
    print(
        f"[scale]   search {search} errors {errors}; recommendations {recs.latency_ms}", flush=True
    )
    return {
        "searches": sent,
        "search_errors": errors,
        "recommendations": asdict(recs),
        "figures": figures,
    }


def run_graph_steps(ctx: Context, steps: Sequence[str], done: dict[str, dict[str, Any]]) -> None:
    """serve and/or search on one graph over the private Redis; Ray stopped whatever happens."""
    from bench.serving_load import graph, sample_users

    assert ctx.redis_url is not None
    users = sample_users(ctx.data_dir, ctx.args.users, ctx.args.cold_share, seed=0)
    settings = serving_settings(ctx.data_dir, ctx.redis_url)
    print("[scale] starting Ray and the graph", flush=True)
    start = time.perf_counter()
    with (
        reaped() as snapshot,
        graph(
            ctx.data_dir,
            ctx.redis_url,
            ctx.args.num_cpus,
            placement=placement_of(ctx.args),
            settings=settings,
        ) as url,
    ):
        try:
            ready_s = time.perf_counter() - start
            print(f"[scale] graph ready at {url} after {ready_s:.0f} s", flush=True)
            if "serve" in steps:
                done["serve"] = timed("serve", lambda: step_serve(ctx, url, users, ready_s))
            if "search" in steps:
                done["search"] = timed("search", lambda: step_search(ctx, url, users))
        finally:
            snapshot()


def timed(name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"\n[scale] === {name} ===", flush=True)
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    print(f"[scale] === {name} done in {seconds:.0f} s ===", flush=True)
    return {**result, "step_seconds": round(seconds, 1), "measured_at": now()}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def parse_steps(text: str) -> list[str]:
    """The steps named (comma-separated, 'all' for every one), in run order; serve and search bring
    materialize (the graph reads the features from the private Redis this run starts)."""
    names = set(STEPS) if text == "all" else {s.strip() for s in text.split(",") if s.strip()}
    unknown = names - set(STEPS)
    if unknown:
        raise SystemExit(f"--steps: unknown {sorted(unknown)}; choose from {', '.join(STEPS)}")
    if names & {"serve", "search"}:
        names.add("materialize")
    return [s for s in STEPS if s in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="generated data, registry, bundles and features (default: /tmp/recserve-scale-<size>)",
    )
    parser.add_argument(
        "--skip-generate", action="store_true", help="reuse the data set already in --data-dir"
    )
    parser.add_argument(
        "--steps", default="all", help=f"comma-separated subset of {','.join(STEPS)} (default all)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds of settings search for recserve train (default: its own, 150)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=300.0,
        help="seconds of load at 50 requests/s, the acceptance rate (default 300)",
    )
    parser.add_argument(
        "--sweep-duration",
        type=float,
        default=60.0,
        help="seconds of load at each other rate (25, 100/s; default 60)",
    )
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds at 25/s, unreported")
    parser.add_argument(
        "--search-duration", type=float, default=60.0, help="seconds of the search step"
    )
    parser.add_argument(
        "--search-rate", type=float, default=5.0, help="catalog searches per second"
    )
    parser.add_argument("--max-requests", type=int, default=100_000, help="cap per rate")
    parser.add_argument("--users", type=int, default=2_000, help="users sampled for the load")
    parser.add_argument("--cold-share", type=float, default=0.1, help="share of unknown users")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--placement",
        default=None,
        help="how the graph groups its stages (serve_app/placement.py: split, two-tier, fused; "
        "default RECSERVE_PLACEMENT, else split); other than split, the figures go to "
        "'<size>+<placement>' in the JSON",
    )
    parser.add_argument("--num-cpus", type=int, default=2, help="Ray's CPUs")
    parser.add_argument(
        "--index-threads", type=int, default=2, help="threads of an index rebuild (default 2)"
    )
    parser.add_argument(
        "--index-queries", type=int, default=1_000, help="served users searched on one thread"
    )
    parser.add_argument(
        "--redis-url",
        help="serve from this Redis, its features already materialized (`recserve features all` "
        "with REDIS_URL set), instead of a private redis-server materialized by this run: "
        "several placements in a row without materializing each time",
    )
    parser.add_argument("--json-out", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    steps = parse_steps(args.steps)
    if args.skip_generate and "generate" in steps:
        steps.remove("generate")
    data_dir = (args.data_dir or Path(f"/tmp/recserve-scale-{args.size}")).resolve()
    state = data_dir / "scale"
    state.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, data_dir, state)
    print(f"[scale] size {args.size} {SIZES[args.size]}; data dir {data_dir}; steps {steps}")
    # SIGTERM as Ctrl-C: every `finally` below runs (children, Redis, Ray stopped).
    signal.signal(signal.SIGTERM, interrupt)
    done: dict[str, dict[str, Any]] = {}
    started = now()
    try:
        for name, run in (
            ("generate", step_generate),
            ("train", step_train),
            ("index", step_index),
        ):
            if name in steps:
                done[name] = timed(name, lambda run=run: run(ctx))  # type: ignore[misc]
        graph_steps = [s for s in steps if s in ("serve", "search")]
        if args.redis_url:
            # Features already materialized there (an earlier run of `recserve features all`).
            ctx.redis_url = args.redis_url
            if "materialize" in args.steps.split(","):
                done["materialize"] = timed("materialize", lambda: step_materialize(ctx))
            if graph_steps:
                run_graph_steps(ctx, graph_steps, done)
        elif "materialize" in steps:
            from bench.serving_load import private_redis

            with private_redis() as redis_url:
                ctx.redis_url = redis_url
                done["materialize"] = timed("materialize", lambda: step_materialize(ctx))
                if graph_steps:
                    run_graph_steps(ctx, graph_steps, done)
    finally:
        if done:
            save(args, argv, data_dir, started, done)
    return 0


def interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def save(
    args: argparse.Namespace,
    argv: list[str],
    data_dir: Path,
    started: str,
    done: dict[str, dict[str, Any]],
) -> None:
    """Merge this run's steps into scale.json, print the table for the size (every step known)."""
    path: Path = args.json_out
    document = json.loads(path.read_text()) if path.exists() else {}
    document.setdefault(
        "about", "bench/scale.py: one table per catalog size (#27); figures keyed by size"
    )
    run = {
        "command": "python bench/scale.py " + shlex.join(argv),
        "machine": machine(),
        "size": {"name": args.size, **SIZES[args.size]},
        "data_dir": str(data_dir),
        "started_at": started,
        "finished_at": now(),
    }
    key = results_key(args)
    run["placement"] = placement_of(args)
    document = merge_results(document, key, run, done)
    print_table(key, document["sizes"][key])
    failed = [a for a in document["sizes"][key]["acceptance"] if a["verdict"] == "FAIL"]
    if failed:
        print(f"[scale] {len(failed)} bar(s) failed: " + ", ".join(a["figure"] for a in failed))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
