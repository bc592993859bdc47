"""Event and catalog validation: the records and the column-wise frame checks agree on the rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from pydantic import ValidationError

from serve_app.schemas import (
    Event,
    EventWindow,
    RowError,
    is_safe_id,
    validate_catalog,
    validate_events,
)
from training.data import normalize_catalog, normalize_events

GOOD = {
    "user_id": "u1",
    "item_id": "i1",
    "event_type": "click",
    "timestamp": "2026-01-01T00:00:00Z",
}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"event_type": "like"}, "event_type"),
        ({"user_id": ""}, "user_id"),
        ({"item_id": "x" * 129}, "item_id"),
        ({"item_id": "bad id"}, "item_id"),
        ({"timestamp": "yesterday"}, "timestamp"),
    ],
)
def test_bad_event_rows_are_named_by_row_and_field(change: dict[str, str], field: str) -> None:
    rows = [GOOD, {**GOOD, **change}]
    with pytest.raises(RowError) as record:
        validate_events(rows)
    assert (record.value.row, record.value.field) == (1, field)
    with pytest.raises(RowError) as frame_record:
        normalize_events(pd.DataFrame(rows))
    assert (frame_record.value.row, frame_record.value.field) == (1, field)
    assert "row 1" in str(frame_record.value)


def test_valid_events_keep_their_values_and_get_utc_and_weights() -> None:
    event = validate_events([{**GOOD, "timestamp": "2026-01-01T01:00:00", "position": 3}])[0]
    assert event.timestamp.utcoffset() is not None and event.position == 3
    frame = normalize_events(
        pd.DataFrame([{**GOOD, "timestamp": "2026-01-02"}, {**GOOD, "event_type": "purchase"}])
    )
    # Sorted by time: the purchase (Jan 1) comes before the click (Jan 2).
    assert list(frame["event_type"]) == ["purchase", "click"]
    assert list(frame["weight"]) == [3.0, 1.0]
    assert str(frame["timestamp"].dtype) == "datetime64[ns, UTC]"


def test_an_id_of_exactly_128_chars_is_accepted() -> None:
    assert Event.model_validate({**GOOD, "user_id": "u" * 128}).user_id == "u" * 128


def test_catalog_rejects_duplicates_and_negative_prices() -> None:
    item = {
        "item_id": "i1",
        "category": "c",
        "price": 1.0,
        "title": "t",
        "created_at": "2026-01-01",
    }
    with pytest.raises(RowError, match="row 1: field 'item_id'"):
        normalize_catalog(pd.DataFrame([item, item]))
    with pytest.raises(RowError, match="row 0: field 'price'"):
        validate_catalog([{**item, "price": -1}])
    with pytest.raises(RowError, match="row 0: field 'price'"):
        normalize_catalog(pd.DataFrame([{**item, "price": -1}]))


# --- events that cannot hurt (issue 29.3) ----------------------------------------------------------


@pytest.mark.parametrize("field", ["user_id", "item_id", "request_id", "session_id", "event_id"])
@pytest.mark.parametrize(
    "bad",
    ["u1\n", "u1\r\n", "\nu1", "u\x00", "u\x1b[31m", "u\x7f", "u\t1", "u\u2028", "u1 "],
    ids=repr,
)
def test_every_id_field_is_matched_whole_without_control_characters(field: str, bad: str) -> None:
    # Python's `$` matches before a final newline: "u1\n" passed the old `ID_PATTERN.match`.
    assert Event.model_validate({**GOOD, field: "u1"})
    with pytest.raises(RowError) as record:
        validate_events([{**GOOD, field: bad}])
    assert record.value.field == field


def test_is_safe_id_takes_whole_ids_only() -> None:
    assert is_safe_id("user-1.a:b@c_d")
    assert is_safe_id("x" * 128) and not is_safe_id("x" * 129)
    assert not any(is_safe_id(v) for v in ("", "u1\n", "u 1", "u\x00", "é"))


@pytest.mark.parametrize(
    "timestamp",
    [
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "1969-12-31T23:59:59Z",
        "2262-01-01T00:00:00Z",
    ],
)
def test_timestamps_outside_what_parquet_holds_are_refused_everywhere(timestamp: str) -> None:
    with pytest.raises(RowError) as record:
        validate_events([{**GOOD, "timestamp": timestamp}])
    assert record.value.field == "timestamp"


NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
WINDOW = EventWindow(max_age=timedelta(days=7), max_ahead=timedelta(minutes=5))


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        (timedelta(0), True),
        (-timedelta(days=7), True),  # the bounds themselves are inside
        (timedelta(minutes=5), True),
        (-timedelta(days=7, microseconds=1), False),
        (timedelta(minutes=5, microseconds=1), False),
        (-timedelta(days=400), False),
        (timedelta(days=1), False),
    ],
)
def test_the_window_accepts_now_minus_seven_days_to_now_plus_five_minutes(
    offset: timedelta, accepted: bool
) -> None:
    raw = {**GOOD, "timestamp": (NOW + offset).isoformat()}
    context = WINDOW.context(NOW)
    if accepted:
        assert Event.model_validate(raw, context=context).timestamp == NOW + offset
    else:
        with pytest.raises(ValidationError) as record:
            Event.model_validate(raw, context=context)
        assert record.value.errors()[0]["loc"] == ("timestamp",)
    # Without a window (training data, spool replays) only the absolute bounds apply.
    assert Event.model_validate(raw).timestamp == NOW + offset


def test_a_client_event_id_is_kept_and_optional() -> None:
    assert Event.model_validate({**GOOD, "event_id": "7f3c-a1"}).event_id == "7f3c-a1"
    assert Event.model_validate(GOOD).event_id is None
