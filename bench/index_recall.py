"""Bench: how much recall@k and latency do HNSW and IVF trade against exact FAISS search?

Builds a flat, an HNSW and an IVF index (training/index.py) over the same synthetic clustered
catalog, sweeps efSearch / nprobe, prints one table and writes JSON. Speedups are ratios to the flat
index measured in the same run, on the same machine load.

    .venv/bin/python bench/index_recall.py --items 100000
    .venv/bin/python bench/index_recall.py --items 1000000 --dim 128 \
        --json-out bench/results/index_recall_1m_d128.json

Indexes are built on `--build-threads` (2: what `write_bundle` uses) and searched on `--threads`
(1: what a serving replica uses). "index MB" is the size FAISS writes (what a replica holds).
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

from serve_app.stages.retriever import search_batch
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
    parser.add_argument(
        "--threads", type=int, default=1, help="FAISS OpenMP threads searching (default 1)"
    )
    parser.add_argument(
        "--build-threads", type=int, default=2, help="FAISS OpenMP threads building (default 2)"
    )
    parser.add_argument(
        "--kinds",
        type=lambda t: t.split(","),
        default=["flat", "hnsw", "ivf", "ivf_pq"],
        help="to build (flat, hnsw, ivf, ivf_pq)",
    )
    parser.add_argument(
        "--filtered-shares",
        type=lambda t: [float(x) for x in t.split(",") if x],
        default=[],
        help="also measure filtered search (the Retriever's search_batch) with these shares of"
        " the catalog allowed, each a random subset: index + selector vs exact over the allowed",
    )
    parser.add_argument("--filtered-queries", type=int, default=100)
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
    base = IndexConfig(threads=args.threads, build_threads=args.build_threads)
    faiss.omp_set_num_threads(args.build_threads)
    exact = exact_neighbours(items, queries, args.k)
    faiss.omp_set_num_threads(args.threads)

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
        (
            "ivf_pq",
            base.model_copy(update={"exact_threshold": 0, "kind": "ivf_pq"}),
            [base.model_copy(update={"ivf_nprobe": nprobe}) for nprobe in args.nprobe],
        ),
    ]
    rows: list[dict[str, Any]] = []
    filtered: list[dict[str, Any]] = []
    for label, config, sweep in plans:
        if label not in args.kinds:
            continue
        start = time.perf_counter()
        index = build_index(items, config)
        build_seconds = time.perf_counter() - start
        index_mb = len(faiss.serialize_index(index)) / 2**20
        if label != "flat":
            set_search_params(index, config)
            filtered.extend(filtered_rows(label, index, items, queries, args))
        for search_config in sweep or [config]:
            set_search_params(index, search_config)
            report = measure_index(index, items, queries, args.k, exact, build_seconds)
            spec = index_spec(index, config)
            rows.append(
                {"kind": label, "params": spec["params"], "index_mb": index_mb, **asdict(report)}
            )
        del index

    flat = rows[0] if rows[0]["kind"] == "flat" else None
    for row in rows:
        row["speedup_p50"] = flat["p50_ms"] / row["p50_ms"] if flat else None
        row["speedup_qps"] = row["qps"] / flat["qps"] if flat else None
        row["is_default"] = row["kind"] == base.kind and _matches_default(row["params"], base)
    return {
        "question": "recall@k and latency of HNSW / IVF / IVF-PQ vs exact FAISS search",
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
        "filtered": filtered,
    }


def filtered_rows(
    label: str, index: faiss.Index, items: np.ndarray, queries: np.ndarray, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Recall@k and latency of the Retriever's filtered search per allowed share, both paths."""
    out: list[dict[str, Any]] = []
    rng = np.random.default_rng(args.seed + 2)
    n, k = len(items), args.k
    q = queries[: args.filtered_queries]
    for share in args.filtered_shares:
        allowed = np.sort(rng.choice(n, size=max(k, int(share * n)), replace=False))
        excluded = np.setdiff1d(np.arange(n), allowed)
        truth = [allowed[np.argsort(-(items[allowed] @ v), kind="stable")[:k]] for v in q]
        for path, exact_below in (("index+selector", 0), ("exact over allowed", n + 1)):
            hits, latencies = 0, []
            for v, t in zip(q, truth, strict=True):
                start = time.perf_counter()
                found, _ = search_batch(index, v[None, :], [k], [excluded], items, exact_below)[0]
                latencies.append(time.perf_counter() - start)
                hits += np.intersect1d(found, t).size
            out.append(
                {
                    "kind": label,
                    "share": share,
                    "allowed": len(allowed),
                    "path": path,
                    "recall_at_k": hits / (k * len(q)),
                    "p50_ms": float(np.percentile(latencies, 50) * 1e3),
                    "p99_ms": float(np.percentile(latencies, 99) * 1e3),
                }
            )
    return out


def _matches_default(params: dict[str, Any], config: IndexConfig) -> bool:
    if "ef_search" in params:
        return bool(params["ef_search"] == config.hnsw_ef_search)
    return bool(params.get("nprobe") == config.ivf_nprobe)


def _param_text(kind: str, params: dict[str, Any]) -> str:
    if kind == "hnsw":
        return f"M={params['m']} efC={params['ef_construction']} efSearch={params['ef_search']}"
    if kind == "ivf":
        return f"nlist={params['nlist']} nprobe={params['nprobe']}"
    if kind == "ivf_pq":
        return (
            f"nlist={params['nlist']} nprobe={params['nprobe']} PQ{params['pq_m']}x4fs"
            f" k_factor={params['k_factor']}"
        )
    return "exact"


def print_table(result: dict[str, Any], console: Console) -> None:
    args = result["args"]
    table = Table(
        title=f"FAISS recall@{args['k']} vs exact: {args['items']:,} items, d={args['dim']}, "
        f"{args['centres']} centres, noise {args['noise']}, {args['queries']} queries, "
        f"search {args['threads']} / build {args['build_threads']} thread(s)"
    )
    columns = ("kind", "params", "build s", "index MB", f"recall@{args['k']}", "p50 ms", "p99 ms")
    for column in (*columns, "QPS"):
        table.add_column(column, justify="left" if column in ("kind", "params") else "right")
    table.add_column("speedup p50", justify="right")
    table.add_column("speedup QPS", justify="right")
    for row in result["rows"]:
        table.add_row(
            row["kind"] + (" *" if row["is_default"] else ""),
            _param_text(row["kind"], row["params"]),
            f"{row['build_seconds']:.1f}",
            f"{row['index_mb']:.0f}",
            f"{row['recall_at_k']:.4f}",
            f"{row['p50_ms']:.3f}",
            f"{row['p99_ms']:.3f}",
            f"{row['qps']:,.0f}",
            "-" if row["speedup_p50"] is None else f"{row['speedup_p50']:.1f}x",
            "-" if row["speedup_qps"] is None else f"{row['speedup_qps']:.1f}x",
        )
    console.print(table)
    console.print("* = IndexConfig default for that kind; speedups are vs flat in this run.")
    if result.get("filtered"):
        table = Table(
            title=f"Filtered search (serve_app.stages.retriever.search_batch), k={args['k']}"
        )
        for column in ("index", "allowed share", "allowed", "path", "recall", "p50 ms", "p99 ms"):
            table.add_column(column, justify="left" if column in ("index", "path") else "right")
        for row in result["filtered"]:
            table.add_row(
                row["kind"],
                f"{row['share']:.3f}",
                f"{row['allowed']:,}",
                row["path"],
                f"{row['recall_at_k']:.4f}",
                f"{row['p50_ms']:.3f}",
                f"{row['p99_ms']:.3f}",
            )
        console.print(table)


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
