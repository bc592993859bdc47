"""bench/scale.py's report: #27's acceptance bars per size, the figures each step measured, the table
and the merge of runs into bench/results/scale.json (keyed by size). Pure: no process, no I/O but the
printed table; tests/unit/test_scale_bench.py checks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from training.config import SIZES

STEPS = ("generate", "train", "index", "materialize", "serve", "search")
RATES = (25.0, 50.0, 100.0)
ACCEPTANCE_RATE = 50.0  # the serving bar is at this rate
# Deployments that can host stages (serve_app/placement.py): split's four, two-tier's two, and the
# Ingress when it hosts the chain (fused).
STAGE_HOSTS = ("UserTower", "Retriever", "Ranker", "ReRanker", "Retrieval", "Ranking", "Ingress")


# --- the bars (#27 "Acceptance"), per size --------------------------------------------------


@dataclass(frozen=True)
class Bar:
    """One acceptance bar: `figure` compared with `threshold` (or with another figure) at `sizes`."""

    figure: str
    op: str  # "<=", ">=" or ">"
    threshold: float | str  # a number, or the name of the figure to beat
    sizes: tuple[str, ...]
    text: str


BARS: tuple[Bar, ...] = (
    Bar("train_s", "<=", 90 * 60, ("xl",), "<= 90 min"),
    Bar("train_s", "<=", 15 * 60, ("large",), "<= 15 min"),
    Bar("train_peak_rss_mb", "<=", 16 * 1024, ("xl",), "<= 16 GiB"),
    Bar("ndcg10_recserve", ">", "ndcg10_popularity", ("xl", "large", "default"), "> popularity"),
    Bar("ndcg10_recserve", ">", "ndcg10_best_baseline", ("xl",), "> strongest baseline"),
    Bar("ndcg10_recserve", ">=", 0.058, ("large",), ">= 0.058 (today's)"),
    Bar("ndcg10_recserve", ">=", 0.18, ("default",), ">= 0.18 (today's)"),
    Bar("index_recall100", ">=", 0.95, ("xl", "large"), ">= 0.95"),
    Bar("search_p99_ms", "<=", 3.0, ("xl",), "<= 3 ms, 1 thread"),
    Bar("materialize_s", "<=", 10 * 60, ("xl",), "<= 10 min"),
    Bar("p99_ms_50", "<=", 50.0, ("xl", "large", "default"), "<= 50 ms"),
    Bar("errors_50", "<=", 0, ("xl", "large", "default"), "0"),
    Bar("stage_replicas_mb", "<=", round(3e9 / 2**20), ("xl",), "<= 3 GB (2,861 MiB)"),
    Bar("demo_search_p99_ms", "<=", 100.0, ("xl",), "<= 100 ms"),
    Bar("p99_ms_with_search", "<=", 50.0, ("xl",), "<= 50 ms (keeps its p99)"),
    Bar("errors_with_search", "<=", 0, ("xl",), "0"),
)


def verdict(bar: Bar, figures: dict[str, Any]) -> str:
    """'pass', 'FAIL', or 'missing' when the figure (or the one to beat) was not measured."""
    value = figures.get(bar.figure)
    other = figures.get(bar.threshold) if isinstance(bar.threshold, str) else bar.threshold
    if not isinstance(value, int | float) or not isinstance(other, int | float):
        return "missing"
    if math.isnan(value) or math.isnan(other):
        return "missing"
    ok = {"<=": value <= other, ">=": value >= other, ">": value > other}[bar.op]
    return "pass" if ok else "FAIL"


def acceptance(size: str, figures: dict[str, Any]) -> list[dict[str, Any]]:
    """The bars that apply at `size`, each with its figure and verdict."""
    return [
        {
            "figure": bar.figure,
            "value": figures.get(bar.figure),
            "bar": bar.text,
            "verdict": verdict(bar, figures),
        }
        for bar in BARS
        if size in bar.sizes
    ]


# --- what each step measured, flattened into figures -------------------------------------------------

# (figure, label, unit) in the table's order; a figure a step did not measure is left out.
ROWS: tuple[tuple[str, str, str], ...] = (
    ("generate_s", "generate: time", "s"),
    ("generate_peak_rss_mb", "generate: peak RSS", "MiB"),
    ("train_s", "train: wall time (data read to registered)", "s"),
    ("train_peak_rss_mb", "train: peak RSS", "MiB"),
    ("ndcg10_recserve", "train: test NDCG@10 recserve", ""),
    ("ndcg10_popularity", "train: test NDCG@10 popularity", ""),
    ("ndcg10_best_baseline", "train: test NDCG@10 strongest baseline", ""),
    ("bundle_mb", "bundle size on disk", "MiB"),
    ("index_recall100", "index recall@100 vs exact (manifest)", ""),
    ("index_build_s", "index build", "s"),
    ("search_recall100", "index recall@100, 1,000 served users (bench)", ""),
    ("search_p50_ms", "index search p50, 1 thread", "ms"),
    ("search_p99_ms", "index search p99, 1 thread", "ms"),
    ("materialize_s", "materialize into Redis", "s"),
    ("materialize_peak_rss_mb", "materialize: peak RSS", "MiB"),
    ("redis_used_mb", "Redis memory after materialize", "MiB"),
    ("graph_ready_s", "graph: start to ready", "s"),
    *(
        row
        for rate in RATES
        for row in (
            (f"p50_ms_{rate:.0f}", f"served p50 at {rate:.0f}/s", "ms"),
            (f"p99_ms_{rate:.0f}", f"served p99 at {rate:.0f}/s", "ms"),
            (f"errors_{rate:.0f}", f"served errors at {rate:.0f}/s", ""),
        )
    ),
    *((f"rss_mb_{d}", f"replica RSS {d}", "MiB") for d in STAGE_HOSTS),
    ("stage_replicas_mb", "stage replicas together", "MiB"),
    ("stage_replicas_pss_mb", "stage replicas together (PSS: shared pages once)", "MiB"),
    ("demo_search_p50_ms", "demo catalog search p50", "ms"),
    ("demo_search_p99_ms", "demo catalog search p99", "ms"),
    ("demo_search_errors", "demo catalog search errors", ""),
    ("p99_ms_with_search", "served p99 at 50/s during the searches", "ms"),
    ("errors_with_search", "served errors at 50/s during the searches", ""),
    ("p99_with_search_over_alone", "served p99 at 50/s, during the searches / alone", "x"),
)


def figures_of(steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every step's `figures` in one flat dict (names do not overlap), and the ratio of the p99 at
    50/s during the catalog searches to the p99 at 50/s alone."""
    out: dict[str, Any] = {}
    for step in STEPS:
        out.update(steps.get(step, {}).get("figures", {}))
    alone, during = out.get("p99_ms_50"), out.get("p99_ms_with_search")
    if isinstance(alone, int | float) and isinstance(during, int | float) and alone > 0:
        out["p99_with_search_over_alone"] = round(during / alone, 2)
    return out


def strongest_baseline(metrics: dict[str, dict[str, float | None]]) -> tuple[str, float] | None:
    """The best NDCG@10 of the test table's systems other than recserve (popularity, item-kNN,
    EASE when it runs, the two-tower's retrieval alone): what recserve has to beat."""
    scored = [
        (name, value)
        for name, values in metrics.items()
        if name != "recserve" and (value := values.get("ndcg@10")) is not None
    ]
    return max(scored, key=lambda pair: pair[1], default=None)


def table_rows(
    size: str,
    figures: dict[str, Any],
    phases: dict[str, dict[str, float]] | None = None,
    notes: dict[str, str] | None = None,
) -> list[tuple[str, str, str, str]]:
    """(label, value, bar, verdict) per measured figure, several bars on one figure joined; the
    training phases (seconds, peak RSS at the phase's end) after the train rows; `notes` append
    to a figure's label (how it was measured)."""
    checks: dict[str, list[tuple[str, str]]] = {}
    for bar in BARS:
        if size in bar.sizes:
            checks.setdefault(bar.figure, []).append((bar.text, verdict(bar, figures)))
    rows = []
    for figure, label, unit in ROWS:
        if figure not in figures:
            continue
        text = format_value(figures[figure]) + (f" {unit}" if unit else "")
        bars = checks.get(figure, [])
        note = (notes or {}).get(figure)
        rows.append(
            (
                f"{label} ({note})" if note else label,
                text,
                "; ".join(b for b, _ in bars) or "-",
                "; ".join(v for _, v in bars) or "-",
            )
        )
        if figure == "train_peak_rss_mb":
            rows += [
                (
                    f"  train phase: {name}",
                    f"{phase['seconds']:,.1f} s, peak {phase['peak_rss_mb']:,.0f} MiB",
                    "-",
                    "-",
                )
                for name, phase in (phases or {}).items()
            ]
    return rows


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:,.4f}" if abs(value) < 1 else f"{value:,.1f}"
    return str(value)


def merge_results(
    document: dict[str, Any], size: str, run: dict[str, Any], steps: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """`document` (scale.json) with `size`'s entry updated: this run's header, its steps replacing
    the same steps of earlier runs, the figures and acceptance recomputed over all of them."""
    sizes = dict(document.get("sizes", {}))
    entry = dict(sizes.get(size, {}))
    merged = {**entry.get("steps", {}), **steps}
    figures = figures_of(merged)
    entry.update(run)
    entry["steps"] = {name: merged[name] for name in STEPS if name in merged}
    entry["figures"] = figures
    entry["acceptance"] = acceptance(base_size(size), figures)
    sizes[size] = entry
    return {**document, "sizes": dict(sorted(sizes.items()))}


def base_size(key: str) -> str:
    """The size of a scale.json key ('xl', or 'xl+fused' for another placement's serving)."""
    return key.split("+", 1)[0]


def print_table(size: str, entry: dict[str, Any]) -> None:
    """The table of one entry in scale.json (its figures, the train step's phases); `size` is its
    key, a size or '<size>+<placement>'."""
    from rich.console import Console
    from rich.table import Table

    config = SIZES[base_size(size)]
    table = Table(
        title=f"recserve at size {size}: {config['n_items']:,} items, {config['n_users']:,} users, "
        f"~{config['n_events']:,} events",
        caption="a phase's peak RSS: the training process's high-water mark when the phase ended; "
        "bars from #27's acceptance for this size",
    )
    for column, justify in (("figure", "left"), ("value", "right"), ("bar (#27)", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    table.add_column("pass/fail")
    steps = entry.get("steps", {})
    notes = {}
    if "build_source" in steps.get("index", {}):
        notes["index_build_s"] = steps["index"]["build_source"]
    phases = steps.get("train", {}).get("phases")
    for label, value, bar, result in table_rows(base_size(size), entry["figures"], phases, notes):
        table.add_row(label, value, bar, result)
    Console(width=140).print(table)
