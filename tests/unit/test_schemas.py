"""Event and catalog validation: the records and the column-wise frame checks agree on the rules."""

from __future__ import annotations

import pandas as pd
import pytest

from serve_app.schemas import Event, RowError, validate_catalog, validate_events
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
