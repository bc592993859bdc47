"""What does the shadow mirror cost the served requests? Open-loop load at several shadow shares.

The same graph as bench/serving_load.py (Ray with 2 CPUs, serve_config.yaml, the registry's champion,
a private Redis), deployed with `experiment.shadow.share` 0 and each of --shares (the shadow is the
champion itself: a mirror costs as much as the served request, the worst case of a same-size
challenger). Each pass redeploys per share, warms up, then runs every rate; passes repeat the shares in
order so that drift of the machine hits all of them. Reported per rate and share: the median over
passes of each run's p50/p99, the p50's difference to share 0 (the issue's budget: under 1 ms), CPU
per request, and how many mirrors were skipped because `max_in_flight` were already running.

Prerequisite: as bench/serving_load.py (a registered champion and materialized features in --data-dir).
Run:
    .venv/bin/python bench/shadow_overhead.py --data-dir /tmp/bench10k --rates 25,50 --shares 0,0.1,1
Prints a table and writes bench/results/shadow_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import serving_load  # noqa: E402  (apply_ray_env ran on import, before Ray Serve)


def settings_with_shadow(data_dir: Path, redis_url: str, share: float) -> dict[str, Any]:
    settings = serving_load.settings_for(data_dir, redis_url)
    settings["experiment"] = {
        "name": f"bench-{int(time.time())}",
        "shadow": {"model": "champion", "share": share},
    }
    return settings


def ray_process_rss_mb() -> dict[str, float]:
    """Resident memory of each Serve replica / Ray process of this machine, by role (max if several)."""
    out: dict[str, float] = {}
    for role, entry in serving_load.ray_processes():
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        rss = next(
            (line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")), "0"
        )
        out[role] = max(out.get(role, 0.0), round(int(rss) / 1024, 1))
    return dict(sorted(out.items()))


def experiments(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/v1/experiments", timeout=10) as response:
        report: dict[str, Any] = json.load(response)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--rates", default="25,50")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the shares")
    parser.add_argument(
        "--shares", default="0,1", help="shadow shares, 0 first (the baseline), e.g. 0,0.1,1"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per rate")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds after each deploy")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument(
        "--json-out", type=Path, default=ROOT / "bench/results/shadow_overhead.json"
    )
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from serve_app.cli import deploy, init_ray, wait_ready
    from serve_app.config import serve_config

    rates = [float(r) for r in args.rates.split(",")]
    shares = [float(x) for x in args.shares.split(",")]
    if shares[0] != 0.0:
        raise SystemExit("--shares must start with 0 (the baseline)")
    users = serving_load.sample_users(args.data_dir, args.users, 0.1, seed=0)
    runs: list[dict[str, Any]] = []
    with serving_load.private_redis() as redis_url:
        init_ray(args.num_cpus)
        port = serving_load.free_port()
        config = serve_config(dict(os.environ))
        serve.start(
            http_options={**config.get("http_options", {}), "host": "127.0.0.1", "port": port},
            logging_config=config.get("logging_config"),
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for round_ in range(args.rounds):
                for share in shares:
                    deploy(settings_with_shadow(args.data_dir, redis_url, share), config)
                    time.sleep(2.0)  # the update starts replacing replicas
                    wait_ready(url, 300)
                    asyncio.run(
                        serving_load.open_loop(url, rates[0], args.warmup, 10_000, users, args.k)
                    )
                    for rate in rates:
                        before = experiments(url)["shadow"]["skipped_busy"]
                        cpu_before = serving_load.ray_process_cpu()
                        result = asyncio.run(
                            serving_load.open_loop(url, rate, args.duration, 10_000, users, args.k)
                        )
                        skipped = experiments(url)["shadow"]["skipped_busy"] - before
                        cpu = serving_load.cpu_per_request(
                            cpu_before, serving_load.ray_process_cpu(), result.ok
                        )
                        runs.append(
                            {
                                "round": round_,
                                "share": share,
                                "rate": rate,
                                "ok": result.ok,
                                "errors": result.errors,
                                "latency_ms": result.latency_ms,
                                "server_ms": result.server_ms,
                                "skipped_busy": skipped,
                                "cpu_ms_per_request": cpu,
                                "rss_mb": ray_process_rss_mb(),
                            }
                        )
                        print(
                            f"round {round_} shadow {share:.0%} rate {rate:.0f}: "
                            f"p50 {result.latency_ms['p50']} p99 {result.latency_ms['p99']} "
                            f"errors {result.errors} skipped {skipped}",
                            flush=True,
                        )
                        time.sleep(2.0)
        finally:
            serve.shutdown()
            ray.shutdown()

    by: dict[tuple[float, float], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by[(run["rate"], run["share"])].append(run)

    def median(rate: float, share: float, key: str, q: str) -> float:
        return round(statistics.median(r[key][q] for r in by[(rate, share)]), 2)

    table = []
    print(
        f"\n{'rate':>5} {'share':>6} {'p50':>8} {'Δp50 ms':>8} {'p99':>8} {'errors':>6} "
        f"{'skipped':>7} {'cpu ms/req':>10}"
    )
    for rate in rates:
        base = median(rate, 0.0, "latency_ms", "p50")
        for share in shares:
            runs_here = by[(rate, share)]
            row = {
                "rate": rate,
                "share": share,
                "p50_ms": median(rate, share, "latency_ms", "p50"),
                "p99_ms": median(rate, share, "latency_ms", "p99"),
                "server_p50_ms": median(rate, share, "server_ms", "p50"),
                "errors": sum(sum(r["errors"].values()) for r in runs_here),
                "skipped_busy": sum(r["skipped_busy"] for r in runs_here),
                "requests": sum(r["ok"] for r in runs_here),
                "cpu_ms_per_request": round(
                    statistics.median(r["cpu_ms_per_request"]["total"] for r in runs_here), 2
                ),
            }
            row["p50_increase_ms"] = round(row["p50_ms"] - base, 2)
            row["p50_ratio_over_share_0"] = round(row["p50_ms"] / base, 3)
            table.append(row)
            print(
                f"{rate:>5.0f} {share:>6.2f} {row['p50_ms']:>8} {row['p50_increase_ms']:>8} "
                f"{row['p99_ms']:>8} {row['errors']:>6} {row['skipped_busy']:>7} "
                f"{row['cpu_ms_per_request']:>10}"
            )
    serving_load.write_results(
        args.json_out, "shadow_overhead.py", argv or sys.argv[1:], {"summary": table, "runs": runs}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
