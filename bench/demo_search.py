"""Bench: what do the demo page's catalog search and id lookup cost over a million items, and how
long do they hold up the event loop that answers recommendations?

Builds `serve_app.demo_catalog.CatalogIndex` over a synthetic catalog (titles of three words and a
number, 500 categories) and times, in process, `serve_app.demo.catalog_page` for a mix of queries:
a plain page deep in the listing, a category page, a common word and its last page, a one-letter
beginning (the most postings a word reads), two words, a rare word, a word that matches nothing,
a word inside a category, an item id, and a lookup of 10 ids.
Then it runs the searches through `asyncio.to_thread` as the route does while a ticker on the loop
measures how late its 1 ms wake-ups come (what a concurrent recommendation would wait).

    flock /tmp/recserve-heavy.lock .venv/bin/python bench/demo_search.py --items 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from serve_app.demo import DemoTables, catalog_items, catalog_page
from serve_app.demo_catalog import CatalogIndex

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ helpers, as the other benchmarks
from bench.results_file import write_results  # noqa: E402

ADJECTIVES = [
    "red",
    "blue",
    "green",
    "small",
    "large",
    "vintage",
    "modern",
    "classic",
    "silent",
    "golden",
]
NOUNS = [
    "lamp",
    "chair",
    "table",
    "story",
    "river",
    "garden",
    "engine",
    "window",
    "letter",
    "journey",
]
RARE = "zephyr"  # in 0.01% of titles


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--categories", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per query")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "demo_search.json"
    )
    return parser.parse_args(argv)


def catalog_table(n: int, categories: int, rng: np.random.Generator) -> pa.Table:
    adjectives = np.array(ADJECTIVES)[rng.integers(0, len(ADJECTIVES), n)]
    nouns = np.array(NOUNS)[rng.integers(0, len(NOUNS), n)]
    titles = [
        f"{a.title()} {b} of {k}" for k, (a, b) in enumerate(zip(adjectives, nouns, strict=True))
    ]
    for k in rng.choice(n, max(1, n // 10_000), replace=False):
        titles[k] = f"The {RARE} {titles[k]}"
    return pa.table(
        {
            "item_id": [f"i{k}" for k in range(n)],
            "category": [f"cat{k:03d}" for k in rng.integers(0, categories, n)],
            "price": rng.uniform(1, 100, n),
            "title": titles,
        }
    )


def _ms(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=110)
    rng = np.random.default_rng(0)
    table = catalog_table(args.items, args.categories, rng)
    process = psutil.Process()
    rss = process.memory_info().rss
    started = time.perf_counter()
    index = CatalogIndex.from_table(table)
    build_seconds = time.perf_counter() - started
    index_mb = (process.memory_info().rss - rss) / 2**20
    tables = DemoTables(index, [])
    category = index.categories[7]
    ids = [f"i{k}" for k in rng.integers(0, args.items, 10)]
    cases: list[tuple[str, Any]] = [
        ("listing, offset 900,000", lambda: catalog_page(tables, "", None, 900_000, 60)),
        ("category page 3", lambda: catalog_page(tables, "", category, 120, 60)),
        ("common word 'lamp'", lambda: catalog_page(tables, "lamp", None, 0, 60)),
        ("common word, page 1,000", lambda: catalog_page(tables, "lamp", None, 59_940, 60)),
        ("one letter 'c'", lambda: catalog_page(tables, "c", None, 0, 60)),
        ("two words 'red lamp'", lambda: catalog_page(tables, "red lamp", None, 0, 60)),
        (f"rare word '{RARE}'", lambda: catalog_page(tables, RARE, None, 0, 60)),
        ("no match", lambda: catalog_page(tables, "qqqxq", None, 0, 60)),
        ("word in a category", lambda: catalog_page(tables, "lamp", category, 0, 60)),
        ("item id 'i4242'", lambda: catalog_page(tables, "i4242", None, 0, 60)),
        ("lookup of 10 ids", lambda: catalog_items(tables, ids)),
    ]
    rows: list[dict[str, Any]] = []
    every: list[float] = []
    for name, call in cases:
        call()  # warm
        samples = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t)
        every += samples
        rows.append({"case": name, **_ms(samples)})
    rows.append({"case": "all searches above", **_ms(every)})

    async def loop_lag() -> dict[str, float]:
        """Lateness of a 1 ms ticker on the loop while the searches run in worker threads."""
        lags: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - t - 0.001)

        tick = asyncio.create_task(ticker())
        for _ in range(max(1, args.repeats // 10)):
            for _, call in cases:
                await asyncio.to_thread(call)
        done.set()
        await tick
        return _ms(lags)

    lag = asyncio.run(loop_lag())
    rows.append({"case": "event-loop lag while searching (1 ms ticker)", **lag})

    out = Table(title=f"Demo catalog search over {args.items:,} items (in process, one thread)")
    for column in ("case", "p50 ms", "p99 ms", "max ms"):
        out.add_column(column, justify="left" if column == "case" else "right")
    for row in rows:
        out.add_row(
            row["case"], f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}", f"{row['max_ms']:.2f}"
        )
    console.print(out)
    console.print(f"index build {build_seconds:.1f} s, RSS +{index_mb:.0f} MiB")
    write_results(
        args.out,
        "demo_search",
        args,
        rows,
        index={"build_seconds": build_seconds, "rss_mib": index_mb},
    )
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
