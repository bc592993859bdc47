"""Issue 16's acceptance on the real Online Retail log: `recserve train` with its defaults, served
(the registered bundle through the serving pipeline's own functions and Feast reads), reaches 1.1x
EASE (lambda tuned on validation) on NDCG@10 on #9's per-customer split."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def online_retail_file() -> Path | None:
    """$RECSERVE_SHARED_DIR/data/online-retail, else ../shared/data/online-retail."""
    directories = []
    if os.environ.get("RECSERVE_SHARED_DIR"):
        directories.append(Path(os.environ["RECSERVE_SHARED_DIR"]) / "data" / "online-retail")
    directories.append(REPO.parent / "shared" / "data" / "online-retail")
    return next(
        (
            d / "online_retail.parquet"
            for d in directories
            if (d / "online_retail.parquet").is_file()
        ),
        None,
    )


def _data_file() -> Path:
    path = online_retail_file()
    if path is None:
        pytest.skip(
            "online_retail.parquet not found under $RECSERVE_SHARED_DIR/data/online-retail "
            "or ../shared/data/online-retail"
        )
    return path


def test_recserve_with_defaults_served_beats_tuned_ease_on_the_test_purchases(
    tmp_path: Path,
) -> None:
    from bench.online_retail_http import SERVED_OFFLINE, TARGET_RATIO, main

    path = _data_file()
    out = tmp_path / "served.json"
    assert main(["--data", str(path), "--in-process-only", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    m = result["metrics"]
    # The protocol as #9 states it: ~4.3k customers with a held-out purchase.
    assert 4_250 <= result["customers"] <= 4_350
    assert m[SERVED_OFFLINE]["users"] == m["EASE"]["users"] == result["customers"]
    # The bar: tuned baselines are far above popularity on this log.
    assert m["EASE"]["ndcg@10"] > 2 * m["popularity"]["ndcg@10"], m
    # Acceptance: the served defaults reach 1.1x EASE's NDCG@10.
    assert m[SERVED_OFFLINE]["ndcg@10"] >= TARGET_RATIO * m["EASE"]["ndcg@10"], m
