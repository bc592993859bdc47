"""One shape for the benchmarks' JSON results: the bench, when, the machine, the arguments, the rows.

Used by bench/{materialize,feature_store,event_spool,demo_search}.py; each prints its own table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def write_results(
    out: Path, bench: str, args: argparse.Namespace, rows: list[dict[str, Any]], **extra: Any
) -> None:
    """Write `rows` with the machine and `args` (paths as text) to `out`; `extra` keys go before
    the rows. The load average is kept because other processes share the cores: read p99 with it."""
    result = {
        "bench": bench,
        "created_at": datetime.now(UTC).isoformat(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],
        },
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **extra,
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
