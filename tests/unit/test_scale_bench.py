"""bench/scale.py's pure parts (bench/scale_report.py): the issue's bars per size, the table rows, the merge of runs into
scale.json, the strongest baseline and the step list. No process is started."""

from __future__ import annotations

import pytest

from bench.scale import parse_steps
from bench.scale_report import (
    BARS,
    STAGE_HOSTS,
    acceptance,
    base_size,
    figures_of,
    merge_results,
    strongest_baseline,
    table_rows,
    verdict,
)


def bar(figure: str, size: str, text: str) -> object:
    return next(b for b in BARS if b.figure == figure and size in b.sizes and b.text == text)


def test_a_bar_passes_at_its_threshold_and_fails_past_it() -> None:
    train = bar("train_s", "xl", "<= 90 min")
    assert verdict(train, {"train_s": 5400.0}) == "pass"  # 90 min = 5,400 s: on the bar
    assert verdict(train, {"train_s": 5400.5}) == "FAIL"
    recall = bar("index_recall100", "xl", ">= 0.95")
    assert verdict(recall, {"index_recall100": 0.95}) == "pass"
    assert verdict(recall, {"index_recall100": 0.9499}) == "FAIL"
    replicas = bar("stage_replicas_mb", "xl", "<= 3 GB (2,861 MiB)")
    assert verdict(replicas, {"stage_replicas_mb": 2861.0}) == "pass"  # 3e9 B / 2**20 = 2,861.0
    assert verdict(replicas, {"stage_replicas_mb": 2862.0}) == "FAIL"
    errors = bar("errors_50", "xl", "0")
    assert verdict(errors, {"errors_50": 0}) == "pass"
    assert verdict(errors, {"errors_50": 1}) == "FAIL"


def test_a_bar_against_another_figure_is_strict_and_missing_without_it() -> None:
    beats = bar("ndcg10_recserve", "xl", "> popularity")
    assert verdict(beats, {"ndcg10_recserve": 0.05, "ndcg10_popularity": 0.01}) == "pass"
    assert verdict(beats, {"ndcg10_recserve": 0.05, "ndcg10_popularity": 0.05}) == "FAIL"
    assert verdict(beats, {"ndcg10_recserve": 0.05}) == "missing"
    assert verdict(beats, {"ndcg10_recserve": None, "ndcg10_popularity": 0.01}) == "missing"
    assert verdict(beats, {"ndcg10_recserve": float("nan"), "ndcg10_popularity": 0.01}) == (
        "missing"
    )


def test_bars_apply_per_size() -> None:
    figures = {"train_s": 1000.0, "train_peak_rss_mb": 20_000.0}
    xl = {(a["figure"], a["bar"]): a["verdict"] for a in acceptance("xl", figures)}
    assert xl[("train_s", "<= 90 min")] == "pass"  # 1,000 s under 5,400 s
    assert xl[("train_peak_rss_mb", "<= 16 GiB")] == "FAIL"  # 20,000 MiB over 16,384 MiB
    large = {(a["figure"], a["bar"]): a["verdict"] for a in acceptance("large", figures)}
    assert large[("train_s", "<= 15 min")] == "FAIL"  # 1,000 s over 900 s
    assert ("train_peak_rss_mb", "<= 16 GiB") not in large  # the issue sets no RSS bar there
    assert acceptance("tiny", figures) == []  # a smoke run has no bars


def test_table_rows_join_the_bars_of_one_figure_and_skip_unmeasured_ones() -> None:
    figures = {"ndcg10_recserve": 0.06, "ndcg10_popularity": 0.011, "train_s": 600.0}
    rows = {
        label: (value, bars, verdicts)
        for label, value, bars, verdicts in table_rows("large", figures)
    }
    assert rows["train: test NDCG@10 recserve"] == (
        "0.0600",
        "> popularity; >= 0.058 (today's)",
        "pass; pass",  # 0.06 > 0.011 and 0.06 >= 0.058
    )
    assert rows["train: wall time (data read to registered)"] == ("600.0 s", "<= 15 min", "pass")
    assert rows["train: test NDCG@10 popularity"] == ("0.0110", "-", "-")
    assert "generate: time" not in rows
    phases = {"search": {"seconds": 559.0, "peak_rss_mb": 2048.0}}
    with_phases = table_rows("large", {**figures, "train_peak_rss_mb": 7577.0}, phases)
    labels = [row[0] for row in with_phases]
    assert labels.index("  train phase: search") == (labels.index("train: peak RSS") + 1)
    assert ("  train phase: search", "559.0 s, peak 2,048 MiB", "-", "-") in (with_phases)
    tiny = table_rows("tiny", figures)
    assert all(bars == "-" and verdicts == "-" for _, _, bars, verdicts in tiny)


def test_merge_keeps_other_steps_and_sizes_and_recomputes_acceptance() -> None:
    earlier = merge_results(
        {"sizes": {"large": {"figures": {"x": 1}}}},
        "xl",
        {"command": "first"},
        {
            "train": {"figures": {"train_s": 6000.0}},
            "index": {"figures": {"search_p99_ms": 2.0}},
        },
    )
    later = merge_results(
        earlier, "xl", {"command": "second"}, {"train": {"figures": {"train_s": 5000.0}}}
    )
    xl = later["sizes"]["xl"]
    assert xl["command"] == "second"
    assert xl["figures"] == {"train_s": 5000.0, "search_p99_ms": 2.0}
    assert list(xl["steps"]) == ["train", "index"]  # run order, whatever the merge order
    verdicts = {(a["figure"], a["bar"]): a["verdict"] for a in xl["acceptance"]}
    assert verdicts[("train_s", "<= 90 min")] == "pass"  # 5,000 s now, was 6,000 s (FAIL)
    assert verdicts[("search_p99_ms", "<= 3 ms, 1 thread")] == "pass"
    assert verdicts[("materialize_s", "<= 10 min")] == "missing"
    assert later["sizes"]["large"] == {"figures": {"x": 1}}


def test_strongest_baseline_is_the_best_system_other_than_recserve() -> None:
    metrics = {
        "recserve": {"ndcg@10": 0.3},
        "popularity": {"ndcg@10": 0.01},
        "retrieval": {"ndcg@10": 0.044},
        "EASE": {"ndcg@10": None},
    }
    assert strongest_baseline(metrics) == ("retrieval", 0.044)
    assert strongest_baseline({"recserve": {"ndcg@10": 0.3}}) is None


def test_serve_and_search_bring_materialize_and_steps_run_in_order() -> None:
    assert parse_steps("search,train") == ["train", "materialize", "search"]
    assert parse_steps("index") == ["index"]
    assert parse_steps("all")[0] == "generate"
    with pytest.raises(SystemExit, match="unknown"):
        parse_steps("train,deploy")


def test_the_p99_during_searches_is_reported_as_a_ratio_to_the_p99_alone() -> None:
    steps = {
        "serve": {"figures": {"p99_ms_50": 40.0}},
        "search": {"figures": {"p99_ms_with_search": 50.0}},
    }
    assert figures_of(steps)["p99_with_search_over_alone"] == 1.25  # 50 / 40
    assert "p99_with_search_over_alone" not in figures_of({"serve": steps["serve"]})


def test_another_placement_keeps_its_own_entry_judged_by_its_size_bars() -> None:
    from bench.scale import stage_hosts

    document = merge_results(
        {}, "xl", {"command": "split"}, {"serve": {"figures": {"p99_ms_50": 70.0}}}
    )
    document = merge_results(
        document, "xl+fused", {"command": "fused"}, {"serve": {"figures": {"p99_ms_50": 40.0}}}
    )
    verdicts = {
        key: {a["figure"]: a["verdict"] for a in entry["acceptance"]}
        for key, entry in document["sizes"].items()
    }
    assert verdicts["xl"]["p99_ms_50"] == "FAIL" and verdicts["xl+fused"]["p99_ms_50"] == "pass"
    assert base_size("xl+fused") == "xl" and base_size("large") == "large"
    assert stage_hosts("split") == ("UserTower", "Retriever", "Ranker", "ReRanker")
    assert stage_hosts("two-tier") == ("Retrieval", "Ranking")
    assert stage_hosts("fused") == ("Ingress",)
    assert set(stage_hosts("two-tier")) | {"Ingress"} <= set(STAGE_HOSTS)
