"""Is the Ray Serve graph as fast as the same functions in one process? One open-loop client, one run.

Side by side, one after the other, on the same bundle, Feast store and Redis:
1. the peer: `bench/peer_app.py` (the same HTTP API and stage functions in one process) under plain
   uvicorn with `--peer-workers` workers: what a user would run instead of a graph;
2. the graph: Ray (2 CPUs) + Serve with `serve_config.yaml`, every hop carrying a batch, under each
   placement of `--placement` (serve_app/placement.py: split, two-tier, fused, or a JSON list of
   groups), one after the other, a fresh Ray each.
Each gets the same open-loop sweep (requests on a fixed schedule whatever the answers; latency from the
scheduled send time). Per rate: p50/p99, errors, CPU ms per answered request by process, and for the
graph the mean batch size per stage (its Prometheus histograms) and resident memory per replica. The
capacity of each side is the highest rate with 0 errors and p99 <= 100 ms; each placement's ratio to the
peer is the figure. A rate that fails is run again (`--attempts`, 2 by default, the same for every
side): one scheduler pause or a GC in a 20 s window is not a capacity, and both sides get the same
second chance. A side's sweep stops at its first rate that fails every attempt.
Then an overload of the graph: `--overload-seconds` at 2x its capacity (rejected answers must be JSON
503 with Retry-After, fast; accepted ones keep their latency), then half capacity, second by second,
to see how soon p99 is back to normal.

Prerequisite: a registered champion and materialized features in --data-dir
    .venv/bin/recserve train --data-dir /tmp/demo --promote && .venv/bin/recserve features all --data-dir /tmp/demo
    (100k items: RECSERVE_SYNTHETIC__... or `recserve train --size large`)
Run:
    .venv/bin/python bench/graph_vs_inprocess.py --data-dir /tmp/demo --rates 50,100,150,200,250 \
        --placement split,two-tier,fused
Prints a table and writes bench/results/graph_vs_inprocess.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_load import (  # noqa: E402
    bundle_summary,
    cpu_per_request,
    free_port,
    percentiles,
    private_redis,
    ray_process_cpu,
    ray_processes,
    sample_users,
    send_on_schedule,
    write_results,
)
from bench.serving_load import graph as serving_graph  # noqa: E402
from serve_app.cli import apply_ray_env  # noqa: E402

apply_ray_env()  # before Ray Serve is imported (serve_app.cli.RAY_ENV)

CAPACITY_P99_MS = 100.0
STAGES = ("ingress", "user_tower", "retriever", "ranker", "reranker")


# --- the client ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    scheduled: float  # seconds since the run started
    latency_ms: float
    status: int  # 0: no HTTP answer
    json_body: bool = True
    retry_after: bool = False
    send_lag_ms: float = 0.0  # how late the client itself started it (its own CPU share)


async def open_loop(
    base_url: str, rate: float, duration: float, users: Sequence[str], k: int
) -> list[Outcome]:
    """Requests on a fixed schedule, whatever the answers; every outcome with its send time."""
    import aiohttp

    count = int(rate * duration)
    outcomes: list[Outcome] = []
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:

        async def one(i: int, scheduled: float) -> None:
            body = {"user_id": users[i % len(users)], "k": k}
            lag_ms = (loop.time() - scheduled) * 1000
            status, is_json, retry = 0, False, False
            try:
                async with session.post("/v1/recommendations", json=body) as response:
                    raw = await response.read()
                    status = response.status
                    is_json = raw[:1] == b"{" and "json" in response.headers.get("content-type", "")
                    retry = "Retry-After" in response.headers
            except (aiohttp.ClientError, TimeoutError):
                pass
            outcomes.append(
                Outcome(
                    scheduled - start,
                    (loop.time() - scheduled) * 1000,
                    status,
                    is_json,
                    retry,
                    lag_ms,
                )
            )

        start = loop.time()
        await send_on_schedule(rate, count, one)
    return outcomes


@dataclass
class RateResult:
    side: str
    rate: float
    sent: int
    ok: int
    errors: dict[str, int]
    latency_ms: dict[str, float]
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)
    batch_size: dict[str, float] = field(default_factory=dict)
    attempt: int = 1  # a failed rate is run again (--attempts): each attempt is kept

    @property
    def clean(self) -> bool:
        return not self.errors and self.latency_ms["p99"] <= CAPACITY_P99_MS


def summarize(side: str, rate: float, outcomes: Sequence[Outcome]) -> RateResult:
    ok = [o.latency_ms for o in outcomes if o.status == 200]
    errors: dict[str, int] = defaultdict(int)
    for o in outcomes:
        if o.status != 200:
            errors[f"http_{o.status}" if o.status else "no_answer"] += 1
    return RateResult(side, rate, len(outcomes), len(ok), dict(errors), percentiles(ok))


def capacity(results: Sequence[RateResult]) -> float | None:
    """The highest rate with 0 errors and p99 <= 100 ms in one of its attempts (below the first
    rate with none)."""
    best = None
    for rate in sorted({r.rate for r in results}):
        if not any(r.clean for r in results if r.rate == rate):
            break
        best = rate
    return best


def sweep(
    rates: Sequence[float], attempts: int, measure: Callable[[float, int], RateResult]
) -> list[RateResult]:
    """`measure(rate, attempt)` for each rate in order, a failed rate again up to `attempts` times;
    stops after the first rate that fails all of them."""
    results: list[RateResult] = []
    for rate in rates:
        for attempt in range(1, attempts + 1):
            result = measure(rate, attempt)
            result.attempt = attempt
            results.append(result)
            if result.clean:
                break
        if not results[-1].clean:
            break
    return results


# --- processes -----------------------------------------------------------------------------------


def tree_pids(root: int) -> list[int]:
    import psutil

    try:
        parent = psutil.Process(root)
    except psutil.NoSuchProcess:
        return []
    return [parent.pid, *(c.pid for c in parent.children(recursive=True))]


def cpu_seconds(pids: Sequence[int]) -> dict[str, float]:
    import psutil

    out: dict[str, float] = defaultdict(float)
    for pid in pids:
        try:
            process = psutil.Process(pid)
            times = process.cpu_times()
            role = (
                "uvicorn worker" if process.parent() and process.parent().pid in pids else "uvicorn"
            )
            out[role] += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return dict(out)


def rss_mb(pids: Sequence[int]) -> list[float]:
    import psutil

    out = []
    for pid in pids:
        try:
            out.append(round(psutil.Process(pid).memory_info().rss / 2**20, 1))
        except psutil.NoSuchProcess:
            continue
    return out


def replica_rss_mb(deployments: Sequence[str]) -> dict[str, float]:
    """Resident memory (MiB) of each Serve replica of this machine among `deployments`."""
    out: dict[str, float] = {}
    for role, entry in ray_processes():
        if role not in deployments:
            continue
        for line in (entry / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out[role] = out.get(role, 0.0) + round(int(line.split()[1]) / 1024, 1)
    return out


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


@contextmanager
def peer(data_dir: Path, redis_url: str, workers: int) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {**os.environ, "PEER_DATA_DIR": str(data_dir), "PEER_REDIS_URL": redis_url}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "uvicorn", "bench.peer_app:app", "--workers", str(workers)]
    command += [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", 300)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def graph(
    data_dir: Path, redis_url: str, num_cpus: int, placement: Any
) -> Iterator[tuple[str, int]]:
    """The graph of `bench/serving_load.py` under `placement`, with Ray's metrics on a port of its
    own."""
    metrics_port = free_port()
    with serving_graph(data_dir, redis_url, num_cpus, metrics_port, placement) as url:
        yield url, metrics_port


_BATCH = re.compile(
    r"^ray_recserve_stage_(batched_requests_total|batch_size_count)\{([^}]*)\} ([0-9.e+-]+)$"
)


def batch_totals(metrics_port: int) -> dict[str, tuple[float, float]]:
    """(requests batched, batches) per stage, from Ray's metrics endpoint: two counts, so their
    ratio is exact (Ray rebuilds a histogram's _sum from bucket midpoints: a batch of 1 adds 0.5)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            return parse_batch_totals(r.read().decode())
    except OSError:
        return {}


def parse_batch_totals(text: str) -> dict[str, tuple[float, float]]:
    """`batch_totals` of one Prometheus text exposition (every series of a stage summed)."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for line in text.splitlines():
        match = _BATCH.match(line)
        if match:
            stage = re.search(r'stage="([^"]+)"', match.group(2))
            if stage:
                column = 0 if match.group(1) == "batched_requests_total" else 1
                totals[stage.group(1)][column] += float(match.group(3))
    return {k: (v[0], v[1]) for k, v in totals.items()}


def mean_batches(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    out = {}
    for stage in STAGES:
        s0, c0 = before.get(stage, (0.0, 0.0))
        s1, c1 = after.get(stage, (0.0, 0.0))
        if c1 > c0:
            out[stage] = round((s1 - s0) / (c1 - c0), 2)
    return out


# --- the sweeps ----------------------------------------------------------------------------------


def sweep_peer(args: argparse.Namespace, redis_url: str, users: list[str]) -> dict[str, Any]:
    with peer(args.data_dir, redis_url, args.peer_workers) as (url, pid):
        asyncio.run(open_loop(url, args.rates[0], args.warmup, users, args.k))

        def measure(rate: float, attempt: int) -> RateResult:
            pids = tree_pids(pid)
            before = cpu_seconds(pids)
            result = summarize(
                "peer", rate, asyncio.run(open_loop(url, rate, args.duration, users, args.k))
            )
            result.cpu_ms_per_request = cpu_per_request(before, cpu_seconds(pids), result.ok)
            print(f"peer  {rate:>5.0f}/s #{attempt}: {fmt(result)}", flush=True)
            time.sleep(1.0)
            return result

        results = sweep(args.rates, args.attempts, measure)
        memory = rss_mb(tree_pids(pid))
    return {"results": results, "rss_mb": memory}


def sweep_graph(
    args: argparse.Namespace, redis_url: str, users: list[str], placement: Any
) -> dict[str, Any]:
    from serve_app.placement import deployment_names

    label = placement if isinstance(placement, str) else json.dumps(placement)
    deployments = ["Ingress", *deployment_names(placement), "EventWriter"]
    with graph(args.data_dir, redis_url, args.num_cpus, placement) as (url, metrics_port):
        asyncio.run(open_loop(url, args.rates[0], args.warmup, users, args.k))
        memory = replica_rss_mb(deployments)

        def measure(rate: float, attempt: int) -> RateResult:
            cpu0, batches0 = ray_process_cpu(), batch_totals(metrics_port)
            result = summarize(
                label, rate, asyncio.run(open_loop(url, rate, args.duration, users, args.k))
            )
            result.cpu_ms_per_request = cpu_per_request(cpu0, ray_process_cpu(), result.ok)
            time.sleep(args.metrics_settle)  # Ray exports metrics every few seconds
            result.batch_size = mean_batches(batches0, batch_totals(metrics_port))
            print(
                f"{label} {rate:>5.0f}/s #{attempt}: {fmt(result)} batches {result.batch_size}",
                flush=True,
            )
            return result

        results = sweep(args.rates, args.attempts, measure)
        overload = None
        cap = capacity(results)
        if cap is not None and args.overload_seconds > 0:
            overload = run_overload(url, cap, args, users, results)
        memory_after = replica_rss_mb(deployments)
    return {
        "placement": placement,
        "deployments": deployments,
        "results": results,
        "rss_mb": memory,
        "rss_mb_after": memory_after,
        "overload": overload,
    }


def run_overload(
    url: str, cap: float, args: argparse.Namespace, users: list[str], results: list[RateResult]
) -> dict[str, Any]:
    """2x capacity for a while, then half capacity: rejections fast and clean, recovery quick."""
    half = cap / 2

    async def both() -> tuple[list[Outcome], list[Outcome]]:
        over = await open_loop(url, 2 * cap, args.overload_seconds, users, args.k)
        after = await open_loop(url, half, args.recovery_seconds, users, args.k)
        return over, after

    over, after = asyncio.run(both())
    rejected = [o for o in over if o.status == 503]
    accepted = [o.latency_ms for o in over if o.status == 200]
    baseline = asyncio.run(open_loop(url, half, args.duration, users, args.k))
    normal_p99 = percentiles([o.latency_ms for o in baseline if o.status == 200])["p99"]
    per_second = []
    for second in range(int(args.recovery_seconds)):
        window = [
            o.latency_ms for o in after if second <= o.scheduled < second + 1 and o.status == 200
        ]
        bad = sum(1 for o in after if second <= o.scheduled < second + 1 and o.status != 200)
        per_second.append({"second": second, "p99": percentiles(window)["p99"], "errors": bad})
    back = next(
        (
            s["second"]
            for s in per_second
            if s["errors"] == 0 and s["p99"] <= max(3 * normal_p99, 30.0)
        ),
        None,
    )
    report = {
        "rate": 2 * cap,
        "sent": len(over),
        "accepted": len(accepted),
        "rejected_503": len(rejected),
        "other": {s: n for s, n in summarize("x", 0, over).errors.items() if s != "http_503"},
        "rejected_all_json_with_retry_after": all(o.json_body and o.retry_after for o in rejected),
        "rejected_latency_ms": percentiles([o.latency_ms for o in rejected]),
        "accepted_latency_ms": percentiles(accepted),
        # part of every latency above: the client was late to send (it shares the cores)
        "client_send_lag_ms": percentiles([o.send_lag_ms for o in over]),
        "half_capacity_p99_ms": normal_p99,
        "accepted_p99_over_half_capacity_p99": round(
            percentiles(accepted)["p99"] / max(normal_p99, 1e-9), 2
        ),
        "recovery_by_second": per_second,
        "back_to_normal_after_s": back,
    }
    print(f"overload {2 * cap:.0f}/s: {report}", flush=True)
    return report


def fmt(r: RateResult) -> str:
    lat = r.latency_ms
    return f"ok {r.ok}/{r.sent} p50 {lat['p50']} p99 {lat['p99']} errors {r.errors} cpu {r.cpu_ms_per_request.get('total')}"


def print_table(peer_results: list[RateResult], sides: dict[str, list[RateResult]]) -> None:
    print(
        f"\n{'side':>12} {'rate':>6} | {'p50':>7} {'p99':>7} {'err':>5} {'cpu ms':>7} | "
        "batch sizes (ingress, stages)"
    )
    for side, results in [("peer", peer_results), *sides.items()]:
        for r in results:
            rate = f"{r.rate:.0f}" + (f"#{r.attempt}" if r.attempt > 1 else "")
            print(
                f"{side:>12} {rate:>6} | {r.latency_ms['p50']:>7} {r.latency_ms['p99']:>7} "
                f"{sum(r.errors.values()):>5} {r.cpu_ms_per_request.get('total', 0):>7} | "
                + ", ".join(f"{s}={v}" for s, v in r.batch_size.items())
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--rates", default="50,100,150,200,250")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per rate")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument(
        "--attempts",
        type=int,
        default=2,
        help="runs of a rate that fails (0 errors, p99 <= 100 ms) before it counts as failed",
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--cold-share", type=float, default=0.1)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--peer-workers", type=int, default=2)
    parser.add_argument("--overload-seconds", type=float, default=30.0)
    parser.add_argument("--recovery-seconds", type=float, default=15.0)
    parser.add_argument(
        "--metrics-settle",
        type=float,
        default=11.0,
        help="seconds to wait after each rate for Ray's metrics export (every 10 s by default: "
        "RAY_metrics_report_interval_ms, left as a deployment has it; a shorter interval costs "
        "the graph's metrics agent CPU)",
    )
    parser.add_argument("--graph-only", action="store_true", help="skip the peer")
    parser.add_argument(
        "--placement",
        default="split",
        help="placements to measure, one after the other: comma-separated presets (split, "
        "two-tier, fused) or one JSON list of groups",
    )
    parser.add_argument(
        "--json-out", type=Path, default=ROOT / "bench/results/graph_vs_inprocess.json"
    )
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]

    placements = parse_placements(args.placement)
    users = sample_users(args.data_dir, args.users, args.cold_share, seed=0)
    graphs: dict[str, dict[str, Any]] = {}
    with private_redis() as redis_url:
        bundle = bundle_summary(args.data_dir, redis_url)
        print(f"bundle: {json.dumps(bundle)}")
        peer_side = (
            {"results": [], "rss_mb": []} if args.graph_only else sweep_peer(args, redis_url, users)
        )
        for placement in placements:
            label = placement if isinstance(placement, str) else json.dumps(placement)
            graphs[label] = sweep_graph(args, redis_url, users, placement)
    print_table(peer_side["results"], {k: v["results"] for k, v in graphs.items()})
    peer_cap = capacity(peer_side["results"])
    summary: dict[str, Any] = {"capacity_rps": {"peer": peer_cap}, "placements": {}}
    print(f"\ncapacity (0 errors, p99 <= {CAPACITY_P99_MS:.0f} ms): peer {peer_cap}")
    for label, side in graphs.items():
        cap = capacity(side["results"])
        ratio = round(cap / peer_cap, 2) if peer_cap and cap else None
        # The last attempt at 100/s: the one that passed, or the confirmed failure.
        p99_at_100 = next(
            (r.latency_ms["p99"] for r in reversed(side["results"]) if r.rate == 100.0), None
        )
        summary["capacity_rps"][label] = cap
        summary["placements"][label] = {
            "capacity_rps": cap,
            "ratio_over_peer": ratio,
            "p99_ms_at_100_rps": p99_at_100,
            "rss_mb_by_replica": side["rss_mb"],
            "rss_mb_sum": round(sum(side["rss_mb"].values()), 1),
        }
        print(
            f"  {label}: capacity {cap}, ratio {ratio}, p99 at 100/s {p99_at_100} ms; resident "
            f"MiB per replica {side['rss_mb']}"
        )
    print(f"peer processes resident MiB {peer_side['rss_mb']}")
    write_results(
        args.json_out,
        "graph_vs_inprocess.py",
        argv or sys.argv[1:],
        {
            "peer": {
                "results": [asdict(r) for r in peer_side["results"]],
                "rss_mb": peer_side["rss_mb"],
            },
            "bundle": bundle,
            "graphs": {
                label: {
                    "placement": side["placement"],
                    "deployments": side["deployments"],
                    "results": [asdict(r) for r in side["results"]],
                    "rss_mb": side["rss_mb"],
                    "rss_mb_after": side["rss_mb_after"],
                    "overload": side["overload"],
                }
                for label, side in graphs.items()
            },
            "summary": summary,
        },
    )
    return 0


def parse_placements(value: str) -> list[Any]:
    """`split,two-tier,fused` or one JSON list of groups (itself containing commas)."""
    from serve_app.placement import parse_placement, resolve_placement

    text = value.strip()
    parts: list[Any] = [text] if text.startswith("[") else [p.strip() for p in text.split(",")]
    out = []
    for part in parts:
        parsed = parse_placement(part)
        resolve_placement(parsed)  # a bad one fails before anything starts
        out.append(parsed)
    return out


if __name__ == "__main__":
    sys.exit(main())
