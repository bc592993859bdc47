"""What does one Ray Serve handle hop cost on this machine? The floor under every stage of the graph.

One run, side by side: a caller deployment awaits an echo deployment `--calls` times, one call at a
time, for each transport (gRPC, Serve's default with the throughput-optimized settings of
`serve_app.cli.RAY_ENV`, and Ray actor calls, `_by_reference=True`), each payload (a small value, a
record the size of a request's retrieval candidates) and each pacing: back to back, and one call every
`--gap-ms` (the graph at a moderate rate, where a hop finds its processes idle). Per case: median and
p99 latency of a hop, CPU ms per hop of the caller and of the callee (their idle CPU over the same time
subtracted), and the ratio of each paced median to the same hop back to back (what idleness costs);
the same echo awaited in process is the line under them.

A request crosses four such hops (UserTower, Retriever, Ranker, ReRanker): four times the median of the
paced row is what the graph's latency cannot go under, whatever its stages do.
Run:
    .venv/bin/python bench/serve_hop.py
Prints a table and writes bench/results/serve_hop.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_load import percentiles, ray_process_cpu, write_results  # noqa: E402
from serve_app.cli import apply_ray_env  # noqa: E402

apply_ray_env()  # before Ray Serve is imported: the graph's own transport settings

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

APP = "hop-bench"
DEPLOYMENTS = ("Caller", "Echo")
PAYLOADS = {"small": 1, "13 KB record": np.zeros(3_300, dtype=np.float32)}


@serve.deployment(max_ongoing_requests=100)
class Echo:
    async def echo(self, value: Any) -> Any:
        return value


@serve.deployment(max_ongoing_requests=100)
class Caller:
    def __init__(self, echo: Any) -> None:
        self._echo = echo

    async def hops(self, calls: int, payload: Any, gap_s: float, by_reference: bool) -> list[float]:
        """Latency (ms) of each of `calls` awaited hops, `gap_s` apart."""
        handle = self._echo.options(_by_reference=by_reference)
        out = []
        for _ in range(calls):
            start = time.perf_counter()
            await handle.echo.remote(payload)
            out.append((time.perf_counter() - start) * 1000.0)
            if gap_s > 0:
                await asyncio.sleep(gap_s)
        return out

    async def in_process(self, calls: int, payload: Any) -> list[float]:
        async def echo(value: Any) -> Any:
            return value

        out = []
        for _ in range(calls):
            start = time.perf_counter()
            await echo(payload)
            out.append((time.perf_counter() - start) * 1000.0)
        return out


def replica_cpu() -> dict[str, float]:
    """CPU seconds used so far by the caller's and the echo's replicas (serving_load's accounting)."""
    cpu = ray_process_cpu()
    return {d: cpu.get(d, 0.0) for d in DEPLOYMENTS}


def idle_cpu_per_second(seconds: float) -> dict[str, float]:
    before = replica_cpu()
    time.sleep(seconds)
    after = replica_cpu()
    return {d: (after[d] - before[d]) / seconds for d in DEPLOYMENTS}


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    caller = serve.get_app_handle(APP)
    idle = idle_cpu_per_second(5.0)
    rows = []
    for transport, by_reference in (("gRPC", False), ("actor call", True)):
        for payload_name, payload in PAYLOADS.items():
            await caller.hops.remote(20, payload, 0.0, by_reference)  # warm the path
            for pacing, gap_s in (
                ("back to back", 0.0),
                (f"every {args.gap_ms:g} ms", args.gap_ms / 1e3),
            ):
                cpu0 = replica_cpu()
                start = time.perf_counter()
                latencies = await caller.hops.remote(args.calls, payload, gap_s, by_reference)
                elapsed = time.perf_counter() - start
                cpu1 = replica_cpu()
                cpu = {
                    d: (cpu1[d] - cpu0[d] - idle[d] * elapsed) * 1000.0 / args.calls
                    for d in DEPLOYMENTS
                }
                rows.append(
                    {
                        "transport": transport,
                        "payload": payload_name,
                        "pacing": pacing,
                        "latency_ms": percentiles(latencies),
                        "caller_cpu_ms": round(cpu["Caller"], 3),
                        "callee_cpu_ms": round(cpu["Echo"], 3),
                    }
                )
    local = await caller.in_process.remote(args.calls, PAYLOADS["13 KB record"])
    for row in rows:  # the same hop back to back: what idleness between calls costs
        dense = next(
            r
            for r in rows
            if r["transport"] == row["transport"]
            and r["payload"] == row["payload"]
            and r["pacing"] == "back to back"
        )
        row["median_over_back_to_back"] = round(
            row["latency_ms"]["p50"] / dense["latency_ms"]["p50"], 2
        )
    rows.append(
        {"transport": "in process (await)", "latency_us": percentiles([x * 1e3 for x in local])}
    )
    await serve.shutdown_async()  # on this loop, which the handles' routers run on
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'transport':<12} {'payload':<13} {'pacing':<14} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'caller cpu':>10} {'callee cpu':>10} {'x back to back':>15}"
    )
    for row in rows:
        if "pacing" not in row:
            print(f"{row['transport']:<41} {row['latency_us']['p50']:>5.2f} us")
            continue
        print(
            f"{row['transport']:<12} {row['payload']:<13} {row['pacing']:<14} "
            f"{row['latency_ms']['p50']:>7.2f} {row['latency_ms']['p99']:>7.2f} "
            f"{row['caller_cpu_ms']:>10.2f} {row['callee_cpu_ms']:>10.2f} "
            f"{row['median_over_back_to_back']:>15.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="hops per case")
    parser.add_argument("--gap-ms", type=float, default=30.0, help="pause between paced hops")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench/results/serve_hop.json")
    args = parser.parse_args(argv)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.run(Caller.bind(Echo.bind()), name=APP, route_prefix=None)
        rows = asyncio.run(measure(args))
    finally:
        ray.shutdown()
    print_table(rows)
    write_results(args.json_out, "serve_hop.py", argv or sys.argv[1:], {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
