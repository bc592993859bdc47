"""What does `"explain": true` cost? The four stage functions in one process, the same users with the
trace off and on, alternating request by request (so both see the same machine), plus the trace's size
as the API returns it (JSON bytes).

Off must cost nothing measurable (the stages only test a flag); on pays one XGBoost SHAP pass over the
request's candidates, two greedy orderings without similarities and the trace's pydantic records.

Prerequisite: a registered champion and materialized features in --data-dir
    .venv/bin/recserve train --data-dir /tmp/demo --promote && .venv/bin/recserve features all --data-dir /tmp/demo
Run:
    .venv/bin/python bench/explain_cost.py --data-dir /tmp/demo --requests 300
Prints a table and writes bench/results/explain_cost.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_load import (  # noqa: E402
    load_served,
    percentiles,
    private_redis,
    sample_users,
    write_results,
)
from serve_app.recommend import recommend_in_process  # noqa: E402
from serve_app.stages.records import Query  # noqa: E402

WARM = 30


def measure(data_dir: Path, redis_url: str, n: int, k: int, seed: int) -> dict[str, Any]:
    served = load_served(data_dir, redis_url)
    model, version, ranking = served.model, served.version, served.settings.ranking
    users = sample_users(data_dir, max(n, 50), cold_share=0.0, seed=seed)
    cost: dict[str, list[float]] = {"off": [], "on": []}
    sizes: list[int] = []
    for i in range(n + WARM):
        user = users[i % len(users)]
        features, seen = served.features.read(model, [user])  # outside the timing: same for both
        query = Query(request_id=str(i), user_id=user, k=k, model_version=version)
        for mode in ("off", "on") if i % 2 else ("on", "off"):
            asked = replace(query, explain=mode == "on")
            start = time.perf_counter()
            (result,) = recommend_in_process(model, [asked], features, seen, ranking)
            if result.trace is not None:  # what the ingress adds: the trace as JSON
                body = json.dumps(result.trace.model_dump(mode="json", exclude_none=True))
            elapsed = (time.perf_counter() - start) * 1000.0
            if i >= WARM:
                cost[mode].append(elapsed)
                if mode == "on":
                    sizes.append(len(body.encode()))
    on, off = percentiles(cost["on"]), percentiles(cost["off"])
    return {
        "model_version": version,
        "n_items": model.n_items,
        "k": k,
        "requests": n,
        "pipeline_ms": {"explain_off": off, "explain_on": on},
        "added_ms_p50": round(on["p50"] - off["p50"], 2),
        "trace_bytes": percentiles([float(s) for s in sizes]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "explain_cost.json"
    )
    args = parser.parse_args(argv)
    with private_redis() as redis_url:
        result = measure(args.data_dir, redis_url, args.requests, args.k, args.seed)
    off, on = result["pipeline_ms"]["explain_off"], result["pipeline_ms"]["explain_on"]
    print(
        f"stage functions in one process, {result['n_items']} items, k={args.k}, "
        f"{args.requests} requests each"
    )
    print(f"{'explain':<8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for name, row in (("off", off), ("on", on)):
        print(f"{name:<8} {row['p50']:>8.2f} {row['p95']:>8.2f} {row['p99']:>8.2f}")
    size = result["trace_bytes"]
    print(
        f"added p50: {result['added_ms_p50']:.2f} ms; trace JSON p50 {size['p50']:.0f} B, "
        f"p99 {size['p99']:.0f} B"
    )
    write_results(args.out, "explain_cost.py", sys.argv[1:] if argv is None else argv, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
