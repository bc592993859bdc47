"""What does the Ray Serve graph cost, and where? Open-loop HTTP load on loopback vs the same pipeline in one process.

1. In-process: the same bundle (from the registry), the same Feast store and Redis, the same pure functions
   (`serve_app.recommend`), one request after another: the cost of the work itself.
2. The graph: Ray (2 CPUs) + Serve with `serve_config.yaml`, then for each arrival rate an open-loop load
   (requests sent on a fixed schedule whatever the answers, latency measured from the scheduled send time,
   bounded by duration and count, 127.0.0.1 only) with `?debug=1` so that every answer carries the stages'
   own timings. Reported per rate: throughput, p50/p95/p99, errors, per-stage p50/p99, the hops' share
   (router's view minus the stages' own work) and the CPU each Ray process spent per answered request.

Prerequisite: a registered champion and materialized features in --data-dir, e.g. for a 10k-item catalog
    RECSERVE_SYNTHETIC__N_ITEMS=10000 RECSERVE_SYNTHETIC__N_USERS=20000 RECSERVE_SYNTHETIC__N_EVENTS=500000 \\
        RECSERVE_SYNTHETIC__N_CATEGORIES=50 .venv/bin/recserve train --data-dir /tmp/bench10k --promote
    .venv/bin/recserve features all --data-dir /tmp/bench10k
Run:
    .venv/bin/python bench/serving_load.py --data-dir /tmp/bench10k --rates 25,50,100,150,200
Prints a table and writes bench/results/serving_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.cli import apply_ray_env  # noqa: E402

apply_ray_env()  # before Ray Serve is imported (serve_app.cli.RAY_ENV)

from serve_app.config import RankingConfig, ServeSettings  # noqa: E402
from serve_app.recommend import recommend_in_process  # noqa: E402
from serve_app.stages.records import Query  # noqa: E402

STAGES = ("user_features", "user_tower", "retriever", "ranker", "reranker", "graph")


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "mean": float("nan")}
    array = np.asarray(values, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(array, 50)), 2),
        "p95": round(float(np.percentile(array, 95)), 2),
        "p99": round(float(np.percentile(array, 99)), 2),
        "mean": round(float(array.mean()), 2),
    }


def sample_users(data_dir: Path, n: int, cold_share: float, seed: int) -> list[str]:
    """Known users from the feature table, with a share of unknown ones (cold start)."""
    table = pq.read_table(data_dir / "features" / "user_profile.parquet", columns=["user_id"])
    known = sorted(set(table.column(0).to_pylist()))
    rng = np.random.default_rng(seed)
    chosen = [str(u) for u in rng.choice(known, size=min(n, len(known)), replace=False)]
    n_cold = int(len(chosen) * cold_share)
    users = [f"cold-{i}" for i in range(n_cold)] + chosen[n_cold:]
    rng.shuffle(users)  # cold users spread over the run, not all at its start
    return users


def settings_for(data_dir: Path, redis_url: str) -> dict[str, Any]:
    return {
        "feature_store": {"data_dir": str(data_dir), "profile": "embedded"},
        "redis_url": redis_url,
    }


# --- in process ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedModel:
    """What the graph serves, loaded in this process: the champion bundle and the Feast reader."""

    settings: ServeSettings
    version: str
    model: Any  # serve_app.recommend.ServingModel
    features: Any  # serve_app.deployments.user_tower.UserFeatureSource


def load_served(data_dir: Path, redis_url: str) -> ServedModel:
    """The registry's champion (cache + checksums) and the UserTower's feature reader, no Ray."""
    from serve_app.deployments.user_tower import UserFeatureSource
    from serve_app.recommend import limit_threads

    limit_threads()
    settings, source, version = champion(data_dir, redis_url)
    return ServedModel(
        settings, version, source.load(version), UserFeatureSource.from_settings(settings)
    )


def champion(data_dir: Path, redis_url: str) -> tuple[ServeSettings, Any, str]:
    """The serving settings for `data_dir`, their `ModelSource` and the version its alias names."""
    from serve_app.models import ModelSource

    settings = ServeSettings(**settings_for(data_dir, redis_url))
    source = ModelSource.from_settings(settings)
    return settings, source, source.resolve()


# The bundle's settings that decide what a request costs; the settings search may choose them anew on
# every training run (collaborative models on or off, candidates ranked, the ranker's trees), so two
# runs of a benchmark compare only on the same bundle. On the demo data, the same code served a bundle
# with the settings as given (collaborative models on, 100 candidates) in 3.9 ms of stage CPU per
# request in process, and one the search chose (collaborative models off, 75 candidates) in 2.3 ms.
COST_PARAMS = (
    "collaborative.enabled",
    "collaborative.ease",
    "collaborative.transitions",
    "collaborative.knn",
    "collaborative.basket",
    "collaborative.per_source",
    "ranker.candidates",
    "ranker.max_depth",
    "ranker_best_iteration",
    "search.kept_given",
)


def bundle_summary(data_dir: Path, redis_url: str) -> dict[str, Any]:
    """The champion's version, catalog size and `COST_PARAMS`, from its manifest (nothing loaded)."""
    from serve_app.bundle import read_manifest

    _, source, version = champion(data_dir, redis_url)
    manifest = read_manifest(source.fetch(version))
    return {
        "version": version,
        "num_items": manifest.num_items,
        **{name: manifest.params.get(name) for name in COST_PARAMS},
    }


def in_process(
    data_dir: Path, redis_url: str, users: Sequence[str], n: int, k: int
) -> dict[str, Any]:
    """The same reads and the same functions, one request at a time, no Ray."""
    served = load_served(data_dir, redis_url)
    version, model, features_source = served.version, served.model, served.features
    ranking: RankingConfig = served.settings.ranking
    stages: dict[str, list[float]] = defaultdict(list)
    totals: list[float] = []
    for i in range(n + 50):
        user = users[i % len(users)]
        query = Query(request_id=str(i), user_id=user, k=k, model_version=version)
        start = time.perf_counter()
        features, seen = features_source.read(model, [user])
        read = time.perf_counter()
        (result,) = recommend_in_process(model, [query], features, seen, ranking)
        end = time.perf_counter()
        assert len(result.items) == k
        if i >= 50:  # the first calls warm caches
            stages["user_features"].append((read - start) * 1000)
            stages["pipeline"].append((end - read) * 1000)
            totals.append((end - start) * 1000)
    return {
        "model_version": version,
        "n_items": model.n_items,
        "requests": n,
        "latency_ms": percentiles(totals),
        "stages_ms": {name: percentiles(v) for name, v in stages.items()},
        "serial_throughput_rps": round(1000.0 / float(np.mean(totals)), 1),
    }


# --- open-loop load ------------------------------------------------------------------------------


@dataclass
class RunResult:
    rate: float
    duration_s: float
    sent: int
    ok: int
    errors: dict[str, int]
    throughput_rps: float
    latency_ms: dict[str, float]
    server_ms: dict[str, float]
    stages_ms: dict[str, dict[str, float]]
    hops_ms: dict[str, float]
    fallbacks: dict[str, int] = field(default_factory=dict)
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)
    round: int = 0


async def send_on_schedule(
    rate: float, count: int, one: Callable[[int, float], Awaitable[None]]
) -> None:
    """Start `one(i, scheduled)` for i < count at `rate` per second, whatever the answers (open
    loop: latency counts from `scheduled`, the loop time it was due), and wait for them all."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i in range(count):
        scheduled = start + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)


async def open_loop(
    base_url: str, rate: float, duration: float, max_requests: int, users: Sequence[str], k: int
) -> RunResult:
    """Send requests on a fixed schedule (open loop) and record every outcome."""
    import aiohttp

    host = base_url.split("//", 1)[1].split(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("this load generator only targets loopback")
    count = min(max_requests, int(rate * duration))
    latencies: list[float] = []
    server: list[float] = []
    stages: dict[str, list[float]] = defaultdict(list)
    hops: list[float] = []
    errors: dict[str, int] = defaultdict(int)
    fallbacks: dict[str, int] = defaultdict(int)
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:

        async def one(i: int, scheduled: float) -> None:
            body = {"user_id": users[i % len(users)], "k": k}
            try:
                async with session.post("/v1/recommendations?debug=1", json=body) as response:
                    payload = await response.json()
                    done = loop.time()
                    if response.status != 200:
                        errors[f"http_{response.status}"] += 1
                        return
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
                return
            latencies.append((done - scheduled) * 1000)
            timings = payload["debug"]["timings_ms"]
            server.append(payload["debug"]["ingress_total_ms"])
            for name in STAGES:
                if name in timings:
                    stages[name].append(timings[name])
            work = sum(
                timings.get(s, 0.0) for s in ("user_tower", "retriever", "ranker", "reranker")
            )
            hops.append(timings["graph"] - work)
            fallbacks[str(payload["fallback"])] += 1

        start = loop.time()
        await send_on_schedule(rate, count, one)
        elapsed = loop.time() - start
    return RunResult(
        rate=rate,
        duration_s=round(elapsed, 2),
        sent=count,
        ok=len(latencies),
        errors=dict(errors),
        throughput_rps=round(len(latencies) / elapsed, 1),
        latency_ms=percentiles(latencies),
        server_ms=percentiles(server),
        stages_ms={name: percentiles(v) for name, v in stages.items()},
        hops_ms=percentiles(hops),
        fallbacks=dict(fallbacks),
    )


# --- where the CPU goes --------------------------------------------------------------------------


def ray_processes() -> Iterator[tuple[str, Path]]:
    """(role, /proc/<pid>) of every Ray process of this machine: a Serve replica's deployment name,
    a Ray actor's class, the Ray core daemons, or Serve's HAProxy ingress."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("ray::ServeReplica:"):
            yield cmdline.split(":")[-1].strip(), entry
        elif cmdline.startswith("ray::"):
            yield cmdline[5:].split(".")[0].split()[0], entry
        elif "raylet" in cmdline or "gcs_server" in cmdline:
            yield "ray core (raylet, gcs)", entry
        elif cmdline.split(" ", 1)[0].endswith("/haproxy"):
            yield "HAProxy", entry


def ray_process_cpu() -> dict[str, float]:
    """CPU seconds used so far by each Ray process of this machine, by role (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = defaultdict(float)
    for role, entry in ray_processes():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[role] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return dict(out)


def write_results(path: Path, script: str, argv: Sequence[str], results: dict[str, Any]) -> None:
    """A benchmark's JSON: the command, the machine, then `results`."""
    document = {
        "command": f"python bench/{script} " + " ".join(argv),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        **results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")


def cpu_per_request(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """Milliseconds of CPU per answered request, by role, heaviest first."""
    used = {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1000 / max(n, 1) for k in after}
    out = {k: round(v, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v > 0}
    return {"total": round(sum(out.values()), 2), **out}


# --- the graph -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ready(url: str) -> bool:
    """The graph at `url` answers /readyz with 200."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def replica_processes(deployment: str, root: int) -> list[Any]:
    """The live processes of `deployment`'s replicas under `root` (the server: its Ray is its own)."""
    import psutil

    title = f"ray::ServeReplica:recserve:{deployment}"
    found = []
    for process in psutil.Process(root).children(recursive=True):
        try:
            cmdline = process.cmdline()
        except psutil.NoSuchProcess:
            continue
        if cmdline and cmdline[0].startswith(title) and process.status() != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


@contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of this benchmark (events and real-time state), removed afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is required")
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", directory],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            import redis

            client = redis.Redis(port=port)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


@contextmanager
def graph(
    data_dir: Path,
    redis_url: str,
    num_cpus: int,
    metrics_port: int | None = None,
    placement: Any = None,
    settings: dict[str, Any] | None = None,
) -> Iterator[str]:
    """Ray, Serve and the graph on a free loopback port; yield its URL. `placement`
    (serve_app/placement.py) None: RECSERVE_PLACEMENT or split; `settings` (ServeSettings fields)
    default to `settings_for(data_dir, redis_url)`: features in the embedded store."""
    import ray
    from ray import serve

    from serve_app.cli import deploy, init_ray, wait_ready
    from serve_app.config import serve_config

    init_ray(num_cpus, metrics_port)
    port = free_port()
    try:
        config = serve_config(dict(os.environ), placement=placement)
        serve.start(
            http_options={**config.get("http_options", {}), "host": "127.0.0.1", "port": port},
            logging_config=config.get("logging_config"),
        )
        settings = dict(settings or settings_for(data_dir, redis_url))
        settings["placement"] = config["applications"][0]["args"]["settings"]["placement"]
        deploy(settings, config)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 300)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def print_table(in_proc: dict[str, Any], runs: list[RunResult]) -> None:
    lat = in_proc["latency_ms"]
    print(
        f"\nin process (no Ray): p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
        f"serial {in_proc['serial_throughput_rps']} rps; features p50 "
        f"{in_proc['stages_ms']['user_features']['p50']} ms, pipeline p50 "
        f"{in_proc['stages_ms']['pipeline']['p50']} ms"
    )
    header = (
        f"{'round':>5} {'rate':>6} {'rps':>7} {'ok':>6} {'err':>5} {'p50':>7} {'p95':>7} {'p99':>7} "
        f"{'server p50':>10} {'hops p50':>9} " + " ".join(f"{s[:10]:>10}" for s in STAGES[:-1])
    )
    print(header)
    for r in runs:
        stages = " ".join(
            f"{r.stages_ms.get(s, {}).get('p50', float('nan')):>10}" for s in STAGES[:-1]
        )
        print(
            f"{r.round:>5} {r.rate:>6.0f} {r.throughput_rps:>7} {r.ok:>6} {sum(r.errors.values()):>5} "
            f"{r.latency_ms['p50']:>7} {r.latency_ms['p95']:>7} {r.latency_ms['p99']:>7} "
            f"{r.server_ms['p50']:>10} {r.hops_ms['p50']:>9} {stages}"
        )


def summarize(
    runs: Sequence[RunResult], rates: Sequence[float], in_proc: dict[str, Any]
) -> dict[str, Any]:
    """Per rate over the rounds: median and worst p99, errors in any round; the issue's goals."""
    by_rate: dict[str, dict[str, Any]] = {}
    clean: list[float] = []  # rates with no error in any round and a median p99 under 100 ms
    for rate in rates:
        same = [r for r in runs if r.rate == rate]
        p99s = [r.latency_ms["p99"] for r in same]
        entry = by_rate[f"{rate:.0f}"] = {
            "p99_by_round": p99s,
            "p99_median": float(np.median(p99s)),
            "p99_worst": max(p99s),
            "errors": sum(sum(r.errors.values()) for r in same),
        }
        if entry["errors"] == 0 and entry["p99_median"] < 100:
            clean.append(rate)
    at_50 = by_rate.get("50")
    first = runs[0]
    return {
        "by_rate": by_rate,
        "goal_50rps_p99_le_50ms_zero_errors_median": (
            None if at_50 is None else bool(at_50["p99_median"] <= 50 and not at_50["errors"])
        ),
        "goal_50rps_p99_le_50ms_zero_errors_every_round": (
            None if at_50 is None else bool(at_50["p99_worst"] <= 50 and not at_50["errors"])
        ),
        "highest_rate_median_p99_lt_100ms_zero_errors": max(clean, default=None),
        "ratio_p50_graph_over_in_process_at_lowest_rate": round(
            first.latency_ms["p50"] / in_proc["latency_ms"]["p50"], 2
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--rates", default="25,50,75,100,150,200")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per rate")
    parser.add_argument("--max-requests", type=int, default=10_000, help="cap per rate")
    parser.add_argument(
        "--warmup", type=float, default=5.0, help="seconds at the first rate, unreported"
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--cold-share", type=float, default=0.1)
    parser.add_argument("--in-process-requests", type=int, default=1_000)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=1, help="sweeps over the rates (the summary takes medians)"
    )
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench/results/serving_load.json")
    args = parser.parse_args(argv)

    rates = [float(r) for r in args.rates.split(",")]
    users = sample_users(args.data_dir, args.users, args.cold_share, seed=0)
    with private_redis() as redis_url:
        in_proc = in_process(args.data_dir, redis_url, users, args.in_process_requests, args.k)
        print(f"in process: {json.dumps(in_proc['latency_ms'])}", flush=True)
        runs: list[RunResult] = []
        with graph(args.data_dir, redis_url, args.num_cpus) as url:
            asyncio.run(open_loop(url, rates[0], args.warmup, args.max_requests, users, args.k))
            # Rounds of one rate back to back, rates in the given order: an overloaded rate (and the
            # replicas the autoscaler adds for it) only follows the rates before it.
            for rate, round_ in ((r, n) for r in rates for n in range(args.rounds)):
                before = ray_process_cpu()
                result = asyncio.run(
                    open_loop(url, rate, args.duration, args.max_requests, users, args.k)
                )
                result.cpu_ms_per_request = cpu_per_request(before, ray_process_cpu(), result.ok)
                result.round = round_
                runs.append(result)
                print(
                    f"round {round_} rate {rate:.0f}: p50 {result.latency_ms['p50']} p99 {result.latency_ms['p99']} "
                    f"errors {result.errors}",
                    flush=True,
                )
                time.sleep(2.0)
    print_table(in_proc, runs)
    print("\nCPU ms per answered request, by process (rate: role=ms):")
    for r in runs:
        print(
            f"{r.round:>2} {r.rate:>6.0f}: "
            + ", ".join(f"{k}={v}" for k, v in r.cpu_ms_per_request.items())
        )
    summary = summarize(runs, rates, in_proc)
    print(json.dumps(summary, indent=2))
    write_results(
        args.json_out,
        "serving_load.py",
        argv or sys.argv[1:],
        {"in_process": in_proc, "runs": [asdict(r) for r in runs], "summary": summary},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
