"""How long the synthetic generator takes, and how much memory, from test size to 1M items / 10M events.

Usage: python bench/generate.py [--sizes tiny default large xl] [--json-out bench/results/generate.json]
Prints a table (size, users, items, events, seconds, events/s, peak RSS) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from training.config import SIZES, SyntheticConfig
from training.synthetic import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["tiny", "default", "large"], choices=sorted(SIZES)
    )
    parser.add_argument("--json-out", type=Path, default=Path("bench/results/generate.json"))
    parser.add_argument(
        "--write", type=Path, help="also write each data set as Parquet under this dir"
    )
    args = parser.parse_args()

    rows = []
    for size in args.sizes:
        config = SyntheticConfig(**SIZES[size])
        start = time.perf_counter()
        dataset = generate(config, progress=False)
        seconds = time.perf_counter() - start
        if args.write:
            from training.data import write_dataset

            write_dataset(dataset, args.write / size)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(
            {
                "size": size,
                "users": config.n_users,
                "items": config.n_items,
                "events": len(dataset.events),
                "seconds": round(seconds, 2),
                "events_per_s": round(len(dataset.events) / seconds),
                "peak_rss_mb": round(peak_mb),
            }
        )
        del dataset

    table = Table(title="Synthetic generator")
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()))
    Console(width=140).print(table)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"results": rows}, indent=2))


if __name__ == "__main__":
    main()
