"""Online Retail importer: cleaning rules on a hand-counted fixture, the catalog, the real file."""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

import pandas as pd
import pytest

from training.online_retail import CLEANING_RULES, load_online_retail, title_categories

NAN = math.nan
COLUMNS = [
    "InvoiceNo",
    "StockCode",
    "Description",
    "Quantity",
    "InvoiceDate",
    "UnitPrice",
    "CustomerID",
    "Country",
]
WHITE = "WHITE HANGING HEART T-LIGHT HOLDER"
REGENCY = "REGENCY CAKESTAND 3 TIER"
BIRD = "ASSORTED COLOUR BIRD ORNAMENT"


def dec(day_time: str) -> str:
    """An InvoiceDate in December 2010 in the file's format: dec("01 08:26")."""
    return f"2010-12-{day_time}:00"


# 21 lines in the raw file's own format. 7 survive; each dropped line is counted under the FIRST
# rule it fails, in the order cancellation, quantity, price, customer, product code.
RAW_ROWS = [
    # --- kept (7)
    ("536365", "85123A", WHITE, 6, dec("01 08:26"), 2.55, 17850.0),
    ("536366", "85123a", WHITE + " ", 2, dec("02 09:00"), 2.95, 13047.0),
    ("536367", "85123A", "CREAM HANGING HEART T-LIGHT HOLDER", 1, dec("03 10:00"), 3.25, 17850.0),
    ("536368", "22423", REGENCY, 1, dec("05 12:00"), 12.75, 13047.0),
    ("536369", "22423", "CAKESTAND REGENCY", 2, dec("04 11:00"), 10.95, 12583.0),
    ("536370", " 84879 ", BIRD, 8, dec("06 13:00"), 1.69, 12583.0),
    ("536370", "84879", BIRD, 8, dec("06 13:00"), 1.69, 12583.0),
    # --- cancellation (2): also negative quantity / no customer, counted once, here
    ("C536379", "22423", REGENCY, -1, dec("05 13:00"), 12.75, 13047.0),
    ("C536380", "85123A", WHITE, -2, dec("01 07:00"), 2.55, NAN),
    # --- quantity <= 0 (3)
    ("536381", "84879", "damaged", 0, dec("06 14:00"), 1.69, 12583.0),
    ("536382", "22423", REGENCY, -5, dec("06 15:00"), 0.0, NAN),
    ("536383", "85123A", None, -1, dec("06 16:00"), 2.55, 17850.0),
    # --- unit price <= 0 (2): the second also lacks a customer and a product code
    ("536384", "84879", BIRD, 1, dec("07 09:00"), 0.0, 12583.0),
    ("A563185", "B", "Adjust bad debt", 1, dec("07 10:00"), -11062.06, NAN),
    # --- missing customer (3)
    ("536386", "85123A", WHITE, 3, dec("07 11:00"), 2.55, NAN),
    ("536387", "POST", "POSTAGE", 1, dec("07 12:00"), 18.0, NAN),
    ("536388", "22423", REGENCY, 2, dec("07 13:00"), 12.75, NAN),
    # --- non-product code (4)
    ("536389", "POST", "POSTAGE", 1, dec("08 09:00"), 18.0, 12583.0),
    ("536390", "DOT", "DOTCOM POSTAGE", 1, dec("08 10:00"), 5.0, 17850.0),
    ("536391", "BANK CHARGES", "Bank Charges", 1, dec("08 11:00"), 15.0, 13047.0),
    ("536392", "gift_0001_20", "Gift Voucher £20", 1, dec("08 12:00"), 16.67, 17850.0),
]  # fmt: skip
EXPECTED_DROPPED = {
    "cancellation": 2,
    "quantity_not_positive": 3,
    "price_not_positive": 2,
    "missing_customer": 3,
    "non_product_code": 4,
}


def raw_frame() -> pd.DataFrame:
    return pd.DataFrame([(*row, "United Kingdom") for row in RAW_ROWS], columns=COLUMNS)


@pytest.fixture
def parquet_file(tmp_path: Path) -> Path:
    path = tmp_path / "online_retail.parquet"
    raw_frame().to_parquet(path, index=False)
    return path


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def test_each_cleaning_rule_drops_its_hand_counted_rows(parquet_file: Path) -> None:
    _, report = load_online_retail(parquet_file)
    assert list(report.dropped) == list(CLEANING_RULES)
    assert report.dropped == EXPECTED_DROPPED
    assert report.rows_in == 21
    assert report.rows_out == 7
    assert report.customers == 3  # 17850, 13047, 12583
    assert report.products == 3  # 85123A (both spellings), 22423, 84879 (stripped)


def test_cleaning_counts_are_logged(parquet_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="training.online_retail")
    load_online_retail(parquet_file)
    for rule, count in EXPECTED_DROPPED.items():
        assert f"rule {rule} dropped {count} rows" in caplog.text


def test_events_are_purchases_of_known_customers(parquet_file: Path) -> None:
    ds, _ = load_online_retail(parquet_file)
    got = sorted(
        (r["user_id"], r["item_id"], r["event_type"], r["timestamp"], r["session_id"], r["weight"])
        for r in ds.events.to_dict("records")
    )
    line = ("12583", "84879", "purchase", utc("2010-12-06 13:00"), "536370", 1.0)
    assert got == sorted(
        [
            ("17850", "85123A", "purchase", utc("2010-12-01 08:26"), "536365", 1.0),
            ("13047", "85123A", "purchase", utc("2010-12-02 09:00"), "536366", 1.0),
            ("17850", "85123A", "purchase", utc("2010-12-03 10:00"), "536367", 1.0),
            ("13047", "22423", "purchase", utc("2010-12-05 12:00"), "536368", 1.0),
            ("12583", "22423", "purchase", utc("2010-12-04 11:00"), "536369", 1.0),
            line,
            line,  # the duplicate invoice line is kept
        ]
    )


def test_catalog_title_price_and_first_sale_come_from_kept_rows(parquet_file: Path) -> None:
    ds, _ = load_online_retail(parquet_file)
    catalog = ds.catalog.set_index("item_id")
    assert sorted(catalog.index) == ["22423", "84879", "85123A"]
    # 85123A: WHITE... twice (one with a trailing space), CREAM... once; the cancelled line at
    # 07:00 is not a sale. Median of 2.55, 2.95, 3.25.
    assert catalog.loc["85123A", "title"] == "WHITE HANGING HEART T-LIGHT HOLDER"
    assert catalog.loc["85123A", "price"] == pytest.approx(2.95)
    assert catalog.loc["85123A", "created_at"] == utc("2010-12-01 08:26")
    # 22423: one line each -> alphabetically first; the dropped lines' "REGENCY CAKESTAND 3 TIER"
    # (which would win if counted) and their prices do not count. Median of 12.75 and 10.95.
    assert catalog.loc["22423", "title"] == "CAKESTAND REGENCY"
    assert catalog.loc["22423", "price"] == pytest.approx(11.85)
    assert catalog.loc["22423", "created_at"] == utc("2010-12-04 11:00")
    assert catalog.loc["84879", "title"] == "ASSORTED COLOUR BIRD ORNAMENT"
    assert catalog.loc["84879", "price"] == pytest.approx(1.69)


def test_tiny_catalog_gets_one_cluster_per_product_named_from_its_title(parquet_file: Path) -> None:
    ds, _ = load_online_retail(parquet_file)
    assert ds.catalog["category"].nunique() == 3
    for row in ds.catalog.to_dict("records"):
        match = re.fullmatch(r"cat0[0-2]_([a-z0-9]+)_([a-z0-9]+)", row["category"])
        assert match, row["category"]
        title_words = set(re.findall(r"[a-z0-9]+", row["title"].lower()))
        assert {match.group(1), match.group(2)} <= title_words


def test_csv_file_gives_the_same_result(tmp_path: Path, parquet_file: Path) -> None:
    csv = tmp_path / "online_retail.csv"
    raw_frame().to_csv(csv, index=False)
    ds_csv, report_csv = load_online_retail(csv)
    ds_parquet, report_parquet = load_online_retail(parquet_file)
    assert report_csv == report_parquet
    pd.testing.assert_frame_equal(ds_csv.events, ds_parquet.events)
    pd.testing.assert_frame_equal(ds_csv.catalog, ds_parquet.catalog)


def test_title_categories_group_by_shared_words_and_ignore_digits_and_stop_words() -> None:
    titles = [
        "RED HEART AND CANDLE HOLDER",
        "12 BLUE PAPER NAPKINS",
        "PINK HEART AND CANDLE HOLDER",
        "12 PINK PAPER NAPKINS",
        "WHITE HEART AND CANDLE HOLDER",
    ]
    # Within each group the shared words tie; ties are alphabetical, so kept digits ("12") or stop
    # words ("and") would lead the names.
    heart, napkins = "cat00_candle_heart", "cat01_napkins_paper"
    assert title_categories(titles, n_categories=2, seed=0) == [
        heart,
        napkins,
        heart,
        napkins,
        heart,
    ]


def test_title_categories_without_usable_words_fall_back_to_one_cluster() -> None:
    assert title_categories(["12", "3 X", ""], n_categories=24) == ["cat00_misc"] * 3
    assert title_categories([], n_categories=24) == []


def shared_online_retail_dir() -> Path | None:
    candidates = []
    if os.environ.get("RECSERVE_SHARED_DIR"):
        candidates.append(Path(os.environ["RECSERVE_SHARED_DIR"]) / "data" / "online-retail")
    candidates.append(Path(__file__).parents[2].parent / "shared" / "data" / "online-retail")
    return next((c for c in candidates if (c / "online_retail.parquet").is_file()), None)


@pytest.mark.slow
def test_real_file_matches_the_readme_figures() -> None:
    directory = shared_online_retail_dir()
    if directory is None:
        pytest.skip(
            "online_retail.parquet not found under $RECSERVE_SHARED_DIR/data or ../shared/data"
        )
    start = time.perf_counter()
    ds, report = load_online_retail(directory / "online_retail.parquet")
    seconds = time.perf_counter() - start
    assert seconds < 60
    # README: 541,909 rows, 9,288 cancellation lines (the first rule, so counted in full); the
    # later rules see fewer rows than the README's raw counts because of overlaps.
    assert report.rows_in == 541_909
    assert report.dropped["cancellation"] == 9_288
    assert report.dropped["quantity_not_positive"] <= 10_624
    assert report.dropped["price_not_positive"] <= 2_517
    assert report.dropped["missing_customer"] <= 135_080
    assert report.rows_in - sum(report.dropped.values()) == report.rows_out
    # README: "about 396k lines remain, about 4.3k customers and 3.7k products".
    assert 394_000 <= report.rows_out <= 398_000
    assert 4_250 <= report.customers <= 4_350
    assert 3_600 <= report.products <= 3_750
    assert len(ds.events) == report.rows_out
    assert len(ds.catalog) == report.products
    assert ds.catalog["category"].nunique() == 24
    assert ds.events["timestamp"].min() >= utc("2010-12-01")
    assert ds.events["timestamp"].max() < utc("2011-12-10")
