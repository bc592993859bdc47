"""Acceptance on the default generated data set: quality figures from held-out evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import load_settings
from training.pipeline import FINAL_SYSTEM, run_pipeline
from training.synthetic import generate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_default_data_retrieval_beats_popularity_and_ranker_beats_retrieval(tmp_path: Path) -> None:
    # `recserve train` with its defaults on the demo data, the settings search included. The search
    # is bounded by trials instead of wall time: 38, what the default budget (150 s) ran on a quiet
    # 2-core machine on 2026-12-03, so that the outcome does not depend on the machine's load
    # (trials are seeded and run in order; a time budget cut short on a busy machine chooses among
    # fewer). Measured there: 14 trials chose settings scoring NDCG@10 0.176 (1.05x retrieval,
    # twice, the same), 38 trials 0.1815 (1.08x), as `recserve train --promote` did. On another machine
    # of the same kind (2026-12-04), the same code, seeds and 38 trials gave 0.1779 (1.057x), as its
    # `recserve train --promote` did: float results differ between these VMs' CPUs, so the absolute
    # floor sits under both and the ratio to retrieval is the claim.
    search = {"budget_seconds": 3_600.0, "max_trials": 38}
    settings = load_settings(data_dir=tmp_path, register_bundle=False, search=search)
    result = run_pipeline(settings, generate(settings.synthetic, progress=False), progress=False)
    m = result.metrics
    assert result.search is not None and len(result.search.trials) == 38
    # Retrieval recall@50 at least 2x the popularity baseline on the test round.
    assert m["retrieval"]["recall@50"] >= 2.0 * m["popularity"]["recall@50"], m
    # What is served (retrieval + collaborative candidates + ranker + re-ranker) beats the
    # retrieval order by at least 5% NDCG@10, and keeps the quality bar of the generated data.
    assert m[FINAL_SYSTEM]["ndcg@10"] >= 1.05 * m["retrieval"]["ndcg@10"], m
    assert m[FINAL_SYSTEM]["ndcg@10"] >= 0.175, m
    # The default index is exact at this catalog size.
    assert result.index_report["recall@100"] == pytest.approx(1.0)
