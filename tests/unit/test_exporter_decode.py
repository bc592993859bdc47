"""The exporter's decoding of stream entries, pure: what it writes to Parquet, and what it moves to the
dead-letter stream instead (anything that would stop it: a missing field, a time pandas cannot hold)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from serve_app.events import stream_entry
from serve_app.schemas import Event
from training.exporter import DeadLetter, decode_entries

T0 = datetime(2026, 3, 1, 12, 0, 0, 5, tzinfo=UTC)


def _raw(**change: str) -> dict[bytes, bytes]:
    """A stream entry as the event writer writes it (serve_app.events.stream_entry), changed."""
    event = Event(user_id="u1", item_id="i1", event_type="click", timestamp=T0, position=2)
    fields = stream_entry(event, "e1") | change
    return {k.encode(): v.encode() for k, v in fields.items()}


def test_a_good_entry_becomes_one_row_with_exact_values() -> None:
    frame, dead = decode_entries([(b"1-0", _raw()), (b"2-0", None)])  # 2-0: deleted, left out
    assert dead == []
    row = frame.iloc[0]
    assert (row["event_id"], row["user_id"], row["event_type"], row["position"]) == (
        "e1",
        "u1",
        "click",
        2,
    )
    # 2026-03-01T12:00:00.000005Z: the microseconds survive the trip.
    assert row["timestamp"].value == 1_772_366_400_000_005_000
    assert row["stream_id"] == "1-0" and len(frame) == 1


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({k: v for k, v in _raw().items() if k != b"timestamp_us"}, "timestamp_us"),
        # Year 9999 and year 1 in microseconds: outside pandas' nanoseconds.
        (_raw(timestamp_us="253402300799000000"), "timestamp_us"),
        (_raw(timestamp_us="-62135596800000000"), "timestamp_us"),
        (_raw(timestamp_us="soon"), "timestamp_us"),
        (_raw(timestamp_us="1" * 40), "timestamp_us"),
        (_raw(event_type="teleport"), "event_type"),
        (_raw(user_id="u1\n"), "user_id"),
        (_raw(item_id=""), "item_id"),
        (_raw(position="-3"), "position"),
        (_raw(position="4294967296"), "position"),
        (_raw(request_id="r 1"), "request_id"),
        ({**_raw(), b"event_id": b"\xff\xfe"}, "event_id"),
    ],
)
def test_an_entry_that_cannot_be_decoded_is_a_dead_letter_naming_the_field(
    raw: dict[bytes, bytes], field: str
) -> None:
    frame, dead = decode_entries([(b"1-0", _raw()), (b"2-0", raw), (b"3-0", _raw(event_id="e3"))])
    assert list(frame["stream_id"]) == ["1-0", "3-0"]  # the others still go through
    assert [d.stream_id for d in dead] == [b"2-0"]
    assert dead[0].fields == raw
    assert f"field '{field}'" in dead[0].error


def test_a_dead_letter_entry_keeps_every_raw_field_and_says_where_from() -> None:
    letter = DeadLetter(b"7-1", {b"user_id": b"\xff", b"odd": b"x"}, "field 'user_id': not UTF-8")
    assert letter.entry("s:events") == {
        b"stream": b"s:events",
        b"stream_id": b"7-1",
        b"error": b"field 'user_id': not UTF-8",
        b"raw:user_id": b"\xff",
        b"raw:odd": b"x",
    }
