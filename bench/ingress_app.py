"""What the Ingress's own HTTP app costs per recommendation request, by path, without Ray.

The app `serve_app.ingress.create_api` builds (the Ingress replica's ASGI app, with its real request
metrics) is called in process over a backend that answers at once, so what is measured is the app:
body reading, validation, the route, the response. Side by side in one run: the common request
through `HotRoute` (no FastAPI routing or dependency solving) and the same request through the
FastAPI route (a query string, `?debug=false`, sends it there). Medians of `--rounds` rounds of CPU
time per request, and their ratio.

    python bench/ingress_app.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_load import write_results  # noqa: E402
from serve_app.config import ApiConfig  # noqa: E402
from serve_app.ingress import create_api  # noqa: E402
from serve_app.metrics import RequestMetrics  # noqa: E402
from serve_app.stages.records import Query, Recommendations, RecommendedItem  # noqa: E402

PATHS = {"hot route": b"", "FastAPI route": b"debug=false"}


class Answering:
    """A backend answering ten items at once: only the app's own work is measured."""

    items = tuple(RecommendedItem(f"i{n}", 1.0 - n / 10, n + 1, "retrieval") for n in range(10))

    async def recommend(self, query: Query) -> Recommendations:
        return Recommendations(query.request_id, query.user_id, "champion", "1", self.items, None)


async def post(app: Any, body: bytes, query_string: bytes) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/recommendations",
        "raw_path": b"/v1/recommendations",
        "query_string": query_string,
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    await app(scope, receive, send)
    return int(sent[0]["status"])


async def measure(requests: int, rounds: int) -> dict[str, list[float]]:
    app = create_api(Answering(), ApiConfig(), RequestMetrics())  # type: ignore[arg-type]
    body = json.dumps({"user_id": "u1", "k": 10, "filters": {"exclude_item_ids": ["i3"]}}).encode()
    out: dict[str, list[float]] = {name: [] for name in PATHS}
    for query_string in PATHS.values():  # warm both paths
        for _ in range(200):
            assert await post(app, body, query_string) == 200
    for _ in range(rounds):  # interleaved: drift in the machine's speed hits both alike
        for name, query_string in PATHS.items():
            started = time.process_time()
            for _ in range(requests):
                await post(app, body, query_string)
            out[name].append((time.process_time() - started) / requests * 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=2_000, help="requests per round and path")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench/results/ingress_app.json")
    args = parser.parse_args(argv)
    samples = asyncio.run(measure(args.requests, args.rounds))
    medians = {name: round(statistics.median(v), 1) for name, v in samples.items()}
    ratio = round(medians["hot route"] / medians["FastAPI route"], 2)
    print(f"{'path':<15} {'CPU us/request (median)':>24} {'min':>8} {'max':>8}")
    for name, values in samples.items():
        print(f"{name:<15} {medians[name]:>24} {min(values):>8.1f} {max(values):>8.1f}")
    print(f"hot route / FastAPI route: {ratio}")
    write_results(
        args.json_out,
        "ingress_app.py",
        argv if argv is not None else sys.argv[1:],
        {
            "cpu_us_per_request": medians,
            "ratio_hot_over_fastapi": ratio,
            "samples": {k: [round(x, 1) for x in v] for k, v in samples.items()},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
