"""MovieLens importer: each public format from a hand-written fixture, expectations read off it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.data import CATALOG_COLUMNS, EVENT_COLUMNS
from training.movielens import load_movielens, rating_event_types, rating_weights

FIXTURES = Path(__file__).parents[1] / "fixtures" / "movielens"


def utc(seconds: int) -> pd.Timestamp:
    return pd.Timestamp(seconds, unit="s", tz="UTC")


def event_rows(events: pd.DataFrame) -> set[tuple[str, str, str, float, pd.Timestamp]]:
    return {
        (r["user_id"], r["item_id"], r["event_type"], round(float(r["weight"]), 4), r["timestamp"])
        for r in events.to_dict("records")
    }


def catalog_rows(catalog: pd.DataFrame) -> dict[str, tuple[str, str, float, pd.Timestamp]]:
    return {
        r["item_id"]: (r["category"], r["title"], r["price"], r["created_at"])
        for r in catalog.to_dict("records")
    }


def test_ratings_map_to_event_types_and_weights_by_band() -> None:
    ratings = np.array([0.5, 1.0, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0])
    view, click, cart, buy = "view", "click", "add_to_cart", "purchase"
    expected = [view, view, view, click, click, cart, cart, buy, buy]
    assert rating_event_types(ratings).tolist() == expected
    assert rating_weights(ratings).tolist() == pytest.approx(
        [0.2, 0.2, 0.2, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    )


def test_loads_ml_100k() -> None:
    ds = load_movielens(FIXTURES / "ml-100k")
    assert ds.name == "movielens-100k"
    assert list(ds.events.columns) == EVENT_COLUMNS
    assert list(ds.catalog.columns) == CATALOG_COLUMNS
    # u.data minus the rating of movie 99, which u.item does not list.
    assert event_rows(ds.events) == {
        ("1", "10", "purchase", 3.0, utc(881250949)),
        ("1", "20", "click", 1.0, utc(881250950)),
        ("2", "10", "add_to_cart", 2.0, utc(881250960)),
        ("2", "30", "view", 0.2, utc(881250970)),
        ("3", "20", "view", 0.2, utc(881250980)),
        ("3", "40", "add_to_cart", 2.0, utc(881251000)),
    }
    assert catalog_rows(ds.catalog) == {
        "10": ("Animation", "Toy Story (1995)", 0.0, pd.Timestamp("1995-01-01", tz="UTC")),
        # latin-1 title; genres Comedy + Romance -> the first flagged one
        "20": ("Comedy", "Métisse (1993)", 0.0, pd.Timestamp("1993-03-15", tz="UTC")),
        # no release date -> its first (only) rating time
        "30": ("unknown", "unknown", 0.0, utc(881250970)),
        "40": ("Drama", '"Big Night" (1996)', 0.0, pd.Timestamp("1996-10-12", tz="UTC")),
        # never rated, still in the catalog
        "50": ("Children's", "Kids in the Hall (1996)", 0.0, pd.Timestamp("1996-07-05", tz="UTC")),
    }


def test_loads_ml_1m() -> None:
    ds = load_movielens(FIXTURES / "ml-1m")
    assert ds.name == "movielens-1m"
    assert event_rows(ds.events) == {
        ("1", "1193", "purchase", 3.0, utc(978300760)),
        ("1", "661", "click", 1.0, utc(978302109)),
        ("2", "1193", "add_to_cart", 2.0, utc(978298413)),
        ("2", "3408", "view", 0.2, utc(978300275)),
        ("3", "661", "view", 0.2, utc(978301968)),
        ("4", "1000", "add_to_cart", 2.0, utc(978303000)),
    }
    assert catalog_rows(ds.catalog) == {
        "661": ("Animation", "James and the Giant Peach (1996)", 0.0, utc(978301968)),
        "1000": ("Drama", "Misérables, Les (1995)", 0.0, utc(978303000)),
        "1193": ("Drama", "One Flew Over the Cuckoo's Nest (1975)", 0.0, utc(978298413)),
        "3408": ("Drama", "Erin Brockovich (2000)", 0.0, utc(978300275)),
        # a ':' inside the title; never rated -> the data set's first rating time
        "3409": ("Action", "Star Wars: Episode IV - A New Hope (1977)", 0.0, utc(978298413)),
    }


def test_loads_ml_latest() -> None:
    ds = load_movielens(FIXTURES / "ml-latest-small")
    assert ds.name == "movielens-latest"
    assert event_rows(ds.events) == {
        ("1", "1", "add_to_cart", 2.0, utc(964982703)),
        ("1", "3", "purchase", 2.5, utc(964981247)),
        ("1", "6", "click", 0.5, utc(964982224)),
        ("2", "1", "view", 0.2, utc(1445714835)),
        ("2", "7", "add_to_cart", 1.5, utc(1445714900)),
    }
    assert catalog_rows(ds.catalog) == {
        "1": ("Adventure", "Toy Story (1995)", 0.0, utc(964982703)),
        "3": ("Comedy", "American President, The (1995)", 0.0, utc(964981247)),
        "6": ("Action", "Heat (1995)", 0.0, utc(964982224)),
        "7": ("unknown", "Misérables, Les (2012)", 0.0, utc(1445714900)),
        "50": ("Musical", '"Great Performances" Cats (1998)', 0.0, utc(964981247)),
    }


def test_events_come_out_in_time_order() -> None:
    ds = load_movielens(FIXTURES / "ml-1m")
    assert ds.events["timestamp"].is_monotonic_increasing


def test_directory_without_a_known_format_is_named_in_the_error(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("1\t1\t5\t881250949\n")  # u.item missing: not ML-100K
    with pytest.raises(ValueError) as info:
        load_movielens(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    for name in ("u.data", "u.item", "ratings.dat", "movies.dat", "ratings.csv", "movies.csv"):
        assert name in message
