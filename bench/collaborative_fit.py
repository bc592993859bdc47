"""Bench: fit time and peak memory of the sparse collaborative models (transitions, item-kNN) at 1M
items, the sizes at which dense EASE is off (`collaborative.max_items`).

A synthetic log, generated here in a few seconds rather than by `training/synthetic.py` (whose xl size
takes ~4 minutes and 13 GB for the users alone): users favour 1-3 of `--categories` categories and pick
items within them by a Zipf(`--zipf`) popularity, so co-occurrence is concentrated the way a real
catalog's is; every event is a positive. Each model is fit by `training.collaborative.fit_collaborative`
with the other models off; "peak RSS" is the process's highest resident set while that fit ran
(sampled every 50 ms), "+RSS" the part above the RSS before it (the log itself excluded).

    .venv/bin/python bench/collaborative_fit.py --items 1000000 --users 500000 --events 10000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import scipy
from rich.console import Console
from rich.table import Table

from training.collaborative import fit_collaborative
from training.config import CollaborativeConfig
from training.features import EncodedLog


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=500_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--categories", type=int, default=500)
    parser.add_argument("--zipf", type=float, default=1.1, help="within-category popularity skew")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json-out", type=Path, default=Path("bench/results/collaborative_fit.json")
    )
    return parser.parse_args(argv)


def synthetic_log(args: argparse.Namespace) -> EncodedLog:
    """`--events` positives of `--users` users over `--items` items (see the module docstring)."""
    rng = np.random.default_rng(args.seed)
    n, c = args.items, args.categories
    item_category = rng.integers(0, c, size=n)
    by_category = np.argsort(item_category, kind="stable")
    starts = np.searchsorted(item_category[by_category], np.arange(c + 1))
    favourites = rng.integers(0, c, size=(args.users, 3))
    n_favourites = rng.integers(1, 4, size=args.users)
    user = np.sort(rng.integers(0, args.users, size=args.events))
    pick = rng.integers(0, 2**31, size=args.events) % n_favourites[user]
    category = favourites[user, pick]
    size = starts[category + 1] - starts[category]
    # Zipf rank within the category (rejected past its size), then a fixed random item order.
    rank = rng.zipf(args.zipf, size=args.events) - 1
    rank = np.where(rank < size, rank, rng.integers(0, 2**31, size=args.events) % size)
    item = by_category[starts[category] + rank]
    ts = np.arange(args.events, dtype=np.int64) * 10**6
    return EncodedLog(
        user_ids=np.array([f"u{i}" for i in range(args.users)]),
        user=user.astype(np.int64),
        item=item.astype(np.int64),
        category=category.astype(np.int64),
        ts=ts,
        weight=np.ones(args.events, dtype=np.float32),
        positive=np.ones(args.events, dtype=bool),
        is_view=np.zeros(args.events, dtype=bool),
        n_items=n,
        n_categories=c,
    )


class PeakRss:
    """Highest RSS of this process while the `with` block runs (a 50 ms sampling thread)."""

    def __enter__(self) -> PeakRss:
        self.process = psutil.Process()
        self.before = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    log = synthetic_log(args)
    generate_seconds = time.perf_counter() - start
    off = {"ease": False, "knn": False, "transitions": False}
    rows = []
    for name in ("transitions", "knn"):
        config = CollaborativeConfig(**{**off, name: True})
        with PeakRss() as rss:
            start = time.perf_counter()
            model = fit_collaborative(log, None, config)
            seconds = time.perf_counter() - start
        matrix = getattr(model, name)
        rows.append(
            {
                "model": name,
                "fit_seconds": seconds,
                "peak_rss_gib": rss.peak / 2**30,
                "added_rss_gib": (rss.peak - rss.before) / 2**30,
                "nnz": int(matrix.nnz),
                "bundle_mb": (matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes)
                / 2**20,
            }
        )
        del model, matrix
    return {
        "question": "fit time and memory of the sparse collaborative models at 1M items",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "generate_seconds": generate_seconds,
        "distinct_user_items": int(np.unique(log.user * args.items + log.item).size),
        "environment": {
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "rows": rows,
    }


def print_table(result: dict[str, Any], console: Console) -> None:
    a = result["args"]
    table = Table(
        title=f"Sparse collaborative fit: {a['items']:,} items, {a['users']:,} users, "
        f"{a['events']:,} events ({result['distinct_user_items']:,} distinct user-item pairs)"
    )
    for column in ("model", "fit s", "peak RSS GiB", "+RSS GiB", "nnz", "CSR MB"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in result["rows"]:
        table.add_row(
            row["model"],
            f"{row['fit_seconds']:.1f}",
            f"{row['peak_rss_gib']:.2f}",
            f"{row['added_rss_gib']:.2f}",
            f"{row['nnz']:,}",
            f"{row['bundle_mb']:.0f}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    print_table(result, console)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
