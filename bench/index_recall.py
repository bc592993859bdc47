"""Bench: how much recall@k and latency do HNSW and IVF trade against exact FAISS search?

Builds a flat, an HNSW and an IVF index (training/index.py) over the same synthetic clustered
catalog, sweeps efSearch / nprobe, prints one table and writes JSON. Speedups are ratios to the flat
index measured in the same run, on the same machine load.

    .venv/bin/python bench/index_recall.py --items 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from rich.console import Console
from rich.table import Table

from training.index import (
    IndexConfig,
    build_index,
    clustered_embeddings,
    exact_neighbours,
    index_spec,
    measure_index,
    mixture_queries,
    set_search_params,
)


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=100_000, help="catalog size (default 100000)")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension (default 64)")
    parser.add_argument("--queries", type=int, default=1_000, help="query count (default 1000)")
    parser.add_argument("--k", type=int, default=100, help="neighbours per query (default 100)")
    parser.add_argument("--centres", type=int, default=100, help="category centres (default 100)")
    parser.add_argument(
        "--noise",
        type=float,
        default=1.0,
        help="norm of each item's offset from its centre before normalising (default 1.0;"
        " larger means weaker category structure)",
    )
    parser.add_argument(
        "--ef-search", type=_int_list, default=[64, 128, 256, 512], help="HNSW efSearch values"
    )
    parser.add_argument(
        "--nprobe", type=_int_list, default=[16, 32, 64, 128], help="IVF nprobe values"
    )
    parser.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json-out",
        type=Path,
        default=Path("bench/results/index_recall.json"),
        help="where to write the results (default bench/results/index_recall.json)",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build each index once, sweep its search knob, and measure every setting."""
    items = clustered_embeddings(args.items, args.dim, args.centres, args.noise, seed=args.seed)
    queries = mixture_queries(items, args.queries, seed=args.seed + 1)
    base = IndexConfig(threads=args.threads)
    exact = exact_neighbours(items, queries, args.k)

    # (label, config, knob values): flat is forced by a threshold above the catalog size.
    plans: list[tuple[str, IndexConfig, list[IndexConfig]]] = [
        ("flat", base.model_copy(update={"exact_threshold": args.items + 1}), []),
        (
            "hnsw",
            base.model_copy(update={"exact_threshold": 0, "kind": "hnsw"}),
            [base.model_copy(update={"hnsw_ef_search": ef}) for ef in args.ef_search],
        ),
        (
            "ivf",
            base.model_copy(update={"exact_threshold": 0, "kind": "ivf"}),
            [base.model_copy(update={"ivf_nprobe": nprobe}) for nprobe in args.nprobe],
        ),
    ]
    rows: list[dict[str, Any]] = []
    for label, config, sweep in plans:
        start = time.perf_counter()
        index = build_index(items, config)
        build_seconds = time.perf_counter() - start
        for search_config in sweep or [config]:
            set_search_params(index, search_config)
            report = measure_index(index, items, queries, args.k, exact, build_seconds)
            spec = index_spec(index, config)
            rows.append({"kind": label, "params": spec["params"], **asdict(report)})

    flat = rows[0]
    for row in rows:
        row["speedup_p50"] = flat["p50_ms"] / row["p50_ms"]
        row["speedup_qps"] = row["qps"] / flat["qps"]
        row["is_default"] = row["kind"] == base.kind and _matches_default(row["params"], base)
    return {
        "question": "recall@k and latency of HNSW / IVF vs exact FAISS search",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "defaults": base.model_dump(),
        "environment": {
            "faiss": faiss.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
        "rows": rows,
    }


def _matches_default(params: dict[str, Any], config: IndexConfig) -> bool:
    if "ef_search" in params:
        return bool(params["ef_search"] == config.hnsw_ef_search)
    return bool(params.get("nprobe") == config.ivf_nprobe)


def _param_text(kind: str, params: dict[str, Any]) -> str:
    if kind == "hnsw":
        return f"M={params['m']} efC={params['ef_construction']} efSearch={params['ef_search']}"
    if kind == "ivf":
        return f"nlist={params['nlist']} nprobe={params['nprobe']}"
    return "exact"


def print_table(result: dict[str, Any], console: Console) -> None:
    args = result["args"]
    table = Table(
        title=f"FAISS recall@{args['k']} vs exact: {args['items']:,} items, d={args['dim']}, "
        f"{args['centres']} centres, noise {args['noise']}, {args['queries']} queries, "
        f"{args['threads']} thread(s)"
    )
    for column in ("kind", "params", "build s", f"recall@{args['k']}", "p50 ms", "p99 ms", "QPS"):
        table.add_column(column, justify="left" if column in ("kind", "params") else "right")
    table.add_column("speedup p50", justify="right")
    table.add_column("speedup QPS", justify="right")
    for row in result["rows"]:
        table.add_row(
            row["kind"] + (" *" if row["is_default"] else ""),
            _param_text(row["kind"], row["params"]),
            f"{row['build_seconds']:.1f}",
            f"{row['recall_at_k']:.4f}",
            f"{row['p50_ms']:.3f}",
            f"{row['p99_ms']:.3f}",
            f"{row['qps']:,.0f}",
            f"{row['speedup_p50']:.1f}x",
            f"{row['speedup_qps']:.1f}x",
        )
    console.print(table)
    console.print("* = IndexConfig default for that kind; speedups are vs flat in this run.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    console = Console()
    if not console.is_terminal:  # piped or logged: rich would wrap the table at 80 columns
        console = Console(width=140)
    print_table(result, console)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
