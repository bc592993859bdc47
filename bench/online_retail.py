"""Bench: on the real Online Retail log and issue 9's protocol, does recserve beat strong baselines?

Loads the UCI Online Retail file (training/online_retail.py), runs `training.protocol` (per-customer
first-purchase split, hyper-parameters tuned on a validation split carved the same way, one test
evaluation) and prints one table: popularity, item-kNN, EASE, recserve retrieval, recserve retrieval
+ ranker (plus ranker feature ablations with --ablations). Writes everything as JSON.

    .venv/bin/python bench/online_retail.py
    .venv/bin/python bench/online_retail.py --ablations   # + rankers on feature subsets
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xgboost as xgb
from rich.console import Console

from training.config import load_settings
from training.evaluate import metrics_table
from training.online_retail import load_online_retail
from training.protocol import FINAL, ProtocolConfig, evaluate_protocol

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = (("contract",), ("contract", "cf"))


def default_data_path() -> Path:
    """$RECSERVE_SHARED_DIR/data/online-retail, else ../shared/data/online-retail next to the repo."""
    shared = Path(os.environ.get("RECSERVE_SHARED_DIR", REPO.parent / "shared"))
    return shared / "data" / "online-retail" / "online_retail.parquet"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--data", type=Path, default=default_data_path(), help="online_retail.parquet or .csv"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and XGBoost threads (default 1: on a shared 2-core box, 2 threads contend)",
    )
    parser.add_argument(
        "--ablations", action="store_true", help="also train rankers on feature-group subsets"
    )
    parser.add_argument(
        "--json-out",
        type=Path,
        default=Path("bench/results/online_retail.json"),
        help="where to write the results (default bench/results/online_retail.json)",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the log, run the protocol, and gather what the JSON records."""
    start = time.perf_counter()
    dataset, report = load_online_retail(args.data)
    load_seconds = time.perf_counter() - start
    settings = load_settings(register_bundle=False)
    settings.two_tower = settings.two_tower.model_copy(update={"threads": args.threads})
    settings.ranker = settings.ranker.model_copy(update={"threads": args.threads})
    config = ProtocolConfig()
    result = evaluate_protocol(
        dataset, settings, config, ablations=ABLATIONS if args.ablations else ()
    )
    ease, final = result.metrics["EASE"]["ndcg@10"], result.metrics[FINAL]["ndcg@10"]
    return {
        "question": "recserve vs popularity / item-kNN / EASE on Online Retail, issue 9 protocol",
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "data": {"path": str(args.data), "rows_in": report.rows_in, "rows_kept": report.rows_out},
        "sizes": result.sizes,
        "metrics": result.metrics,
        "ablations": result.ablations,
        "final_over_ease_ndcg@10": final / ease if ease > 0 else math.nan,
        "tuned": {
            "ease_lambda": result.tuned.ease_lambda,
            "knn_neighbors": result.tuned.knn_neighbors,
            "half_life_days": result.tuned.half_life_days,
            "two_tower_temperature": result.tuned.two_tower_temperature,
            "two_tower_epochs": result.tuned.two_tower_epochs,
            "ranker_depth": result.tuned.ranker_depth,
            "ranker_rounds": result.tuned.ranker_rounds,
            "validation_scores": result.tuned.scores,
        },
        "ranker": result.ranker,
        "protocol_config": config.model_dump(),
        "two_tower_config": settings.two_tower.model_dump(),
        "ranker_config": settings.ranker.model_dump(),
        "timings_s": {"load": round(load_seconds, 2), **result.timings},
        "total_s": round(time.perf_counter() - start, 1),
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "xgboost": xgb.__version__,
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
        },
    }


def _strict(value: Any) -> Any:
    """NaN -> null, recursively, so the file is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found: pass --data or set RECSERVE_SHARED_DIR")
    result = run(args)
    console = Console()
    if not console.is_terminal:  # piped or logged: rich would wrap the table at 80 columns
        console = Console(width=170)
    sizes = result["sizes"]
    title = (
        f"Online Retail, issue 9 protocol: {sizes['test_customers']:,} test customers "
        f"({sizes['cold_test_customers']} cold), {sizes['products']:,} products, "
        f"{sizes['train_pairs']:,} train / {sizes['test_pairs']:,} test pairs"
    )
    console.print(metrics_table({**result["metrics"], **result["ablations"]}, title))
    chosen = {k: v for k, v in result["tuned"].items() if k != "validation_scores"}
    console.print(f"tuned on validation: {chosen}")
    console.print(
        f"{FINAL} / EASE NDCG@10: {result['final_over_ease_ndcg@10']:.3f}x; "
        f"total {result['total_s']:.0f}s"
    )
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(_strict(result), indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
