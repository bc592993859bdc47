"""How long does the demo page wait between a click and the refreshed list? The page's own two calls, in
sequence, against a running graph: `POST /v1/events` (one click), then `POST /v1/recommendations?debug=true`
with `"explain": true` (what the page renders). The same loop without explain gives its cost over HTTP.

One keep-alive connection, one request at a time (a person clicking), known users of `/v1/demo/users`
clicking items of `/v1/demo/catalog` in turn.

Prerequisite: a graph serving the demo, e.g.
    .venv/bin/recserve-serve demo --data-dir /tmp/demo --port 8017
Run:
    .venv/bin/python bench/demo_roundtrip.py --url http://127.0.0.1:8017 --rounds 100
Prints a table and writes bench/results/demo_roundtrip.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_load import percentiles, write_results  # noqa: E402

WARM = 10


def round_trips(
    client: httpx.Client, users: list[str], items: list[str], rounds: int, explain: bool
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {
        "event_ms": [],
        "refresh_ms": [],
        "total_ms": [],
        "server_ms": [],
    }
    for i in range(rounds + WARM):
        user, item = users[i % len(users)], items[(i * 7) % len(items)]
        start = time.perf_counter()
        sent = client.post(
            "/v1/events",
            json={"events": [{"user_id": user, "item_id": item, "event_type": "click"}]},
        )
        posted = time.perf_counter()
        body = {"user_id": user, "k": 10, "explain": explain}
        answer = client.post("/v1/recommendations", params={"debug": "true"}, json=body)
        end = time.perf_counter()
        assert sent.status_code == 202, sent.text
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        assert ("explain" in result) == explain
        if i >= WARM:
            out["event_ms"].append((posted - start) * 1000.0)
            out["refresh_ms"].append((end - posted) * 1000.0)
            out["total_ms"].append((end - start) * 1000.0)
            out["server_ms"].append(float(result["debug"]["ingress_total_ms"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "demo_roundtrip.json"
    )
    args = parser.parse_args(argv)
    with httpx.Client(base_url=args.url, timeout=10.0) as client:
        users = [u["user_id"] for u in client.get("/v1/demo/users").json()["users"]]
        page = client.get("/v1/demo/catalog", params={"limit": 200}).json()
        items = [i["item_id"] for i in page["items"]]
        runs = {
            mode: round_trips(client, users, items, args.rounds, mode == "explain")
            for mode in ("explain", "plain")
        }
    results = {
        "url": args.url,
        "rounds": args.rounds,
        "modes": {mode: {k: percentiles(v) for k, v in run.items()} for mode, run in runs.items()},
    }
    print(f"{args.rounds} click -> refresh round trips, one at a time ({args.url})")
    print(f"{'mode':<8} {'part':<11} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for mode, parts in results["modes"].items():
        for part, row in parts.items():
            print(f"{mode:<8} {part:<11} {row['p50']:>8.1f} {row['p95']:>8.1f} {row['p99']:>8.1f}")
    write_results(args.out, "demo_roundtrip.py", sys.argv[1:] if argv is None else argv, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
