"""Pure logic of the real-time features: EMA steps, event ids, window counts, merging, assembly."""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serve_app.config import RealtimeConfig
from serve_app.contract import KNOWN_USERS_FILE, is_known_user, known_user_keys, user_key
from serve_app.errors import BundleIntegrityError
from serve_app.event_writer import load_known_users
from serve_app.events import (
    ItemEmbeddings,
    ema_update,
    event_alpha,
    event_id,
    stream_entry,
    timestamp_us,
    user_ttl_seconds,
)
from serve_app.features import (
    FeatureShapes,
    UserRealtimeState,
    assemble_user_features,
    merge_recent,
    parse_user_state,
    window_count,
)
from serve_app.schemas import DEFAULT_EVENT_WEIGHTS, Event, EventType

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
WEIGHTS = {EventType(k): v for k, v in DEFAULT_EVENT_WEIGHTS.items()}


def test_ema_starts_from_zero_and_moves_toward_each_item_by_alpha() -> None:
    first = ema_update(None, np.array([1.0, 0.0], np.float32), 0.1)
    np.testing.assert_allclose(first, [0.1, 0.0], rtol=1e-7)
    second = ema_update(first, np.array([0.0, 1.0], np.float32), 0.2)
    # 0.8 * [0.1, 0] + 0.2 * [0, 1]
    np.testing.assert_allclose(second, [0.08, 0.2], rtol=1e-7)
    assert second.dtype == np.float32


def test_event_alpha_scales_rate_by_event_weight_and_caps_at_one() -> None:
    assert event_alpha(EventType.CLICK, WEIGHTS, 0.1) == pytest.approx(0.1)
    assert event_alpha(EventType.PURCHASE, WEIGHTS, 0.1) == pytest.approx(0.3)
    assert event_alpha(EventType.VIEW, WEIGHTS, 0.1) == pytest.approx(0.02)
    assert event_alpha(EventType.SKIP, WEIGHTS, 0.1) == 0.0
    assert event_alpha(EventType.PURCHASE, WEIGHTS, 0.5) == 1.0


def test_event_id_is_stable_for_a_retry_and_changes_with_any_identifying_field() -> None:
    event = Event(user_id="u1", item_id="i1", event_type="click", timestamp=T0, position=3)
    retry = Event.model_validate(event.model_dump())
    assert event_id(event) == event_id(retry)
    variants = [
        event.model_copy(update={"user_id": "u2"}),
        event.model_copy(update={"item_id": "i2"}),
        event.model_copy(update={"event_type": EventType.VIEW}),
        event.model_copy(update={"timestamp": T0.replace(microsecond=123457)}),
        event.model_copy(update={"position": 4}),
        event.model_copy(update={"request_id": "r1"}),
    ]
    assert len({event_id(v) for v in variants} | {event_id(event)}) == 7


def test_a_client_event_id_makes_a_retry_the_same_event_whatever_its_time() -> None:
    first = Event(user_id="u1", item_id="i1", event_type="click", event_id="c-42")
    # A retry without a timestamp gets the server's time again: the content id would change.
    retry = first.model_copy(update={"timestamp": first.timestamp.replace(year=2030)})
    assert event_id(first) == event_id(retry)
    assert event_id(first.model_copy(update={"event_id": None})) != event_id(
        retry.model_copy(update={"event_id": None})
    )
    # Scoped to the user: two users' clients may both count from 1.
    other = first.model_copy(update={"user_id": "u2"})
    assert event_id(other) != event_id(first)
    # "ab" + "c" and "a" + "bc" are different scopes (the user's length is part of the key).
    a = Event(user_id="ab", item_id="i1", event_type="click", event_id="c")
    b = Event(user_id="a", item_id="i1", event_type="click", event_id="bc")
    assert event_id(a) != event_id(b)


def test_known_user_keys_are_sorted_unique_and_looked_up_exactly() -> None:
    keys = known_user_keys(["u3", "u1", "u2", "u1"])
    assert keys.dtype == np.uint64 and len(keys) == 3 and bool(np.all(keys[1:] > keys[:-1]))
    assert [is_known_user(keys, u) for u in ("u1", "u2", "u3", "u4", "")] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert not is_known_user(known_user_keys([]), "u1")
    # blake2b-64 of b"u1", little-endian: worked out with hashlib, not with user_key.
    digest = hashlib.blake2b(b"u1", digest_size=8).digest()
    assert user_key("u1") == struct.unpack("<Q", digest)[0]


def test_a_cold_user_gets_the_shorter_expiry_and_without_a_list_everyone_is_known() -> None:
    rt = RealtimeConfig(user_state_ttl_seconds=30 * 86_400, cold_user_ttl_seconds=86_400)
    vectors = np.zeros((1, 2), np.float32)
    with_list = ItemEmbeddings("v1", {"i1": 0}, vectors, known_user_keys(["known"]))
    without = ItemEmbeddings("v1", {"i1": 0}, vectors)
    assert user_ttl_seconds(rt, with_list, "known") == 30 * 86_400
    assert user_ttl_seconds(rt, with_list, "stranger") == 86_400
    assert user_ttl_seconds(rt, without, "stranger") == 30 * 86_400
    assert user_ttl_seconds(rt, None, "stranger") == 30 * 86_400
    assert RealtimeConfig().cold_user_ttl_seconds == 86_400


def test_stream_entry_carries_exact_microseconds_and_empty_optionals() -> None:
    event = Event(user_id="u1", item_id="i1", event_type="view", timestamp=T0)
    entry = stream_entry(event, "abc")
    # 2026-03-01T12:00:00.123456Z = 1772366400 s since the epoch
    assert entry["timestamp_us"] == str(1_772_366_400_123_456)
    assert timestamp_us(T0) == 1_772_366_400_123_456
    assert entry["position"] == "" and entry["session_id"] == "" and entry["request_id"] == ""


def test_window_count_sums_only_slots_whose_minute_is_inside_the_window() -> None:
    raw = {
        b"s0": b"100", b"c0": b"3",  # now
        b"s1": b"96", b"c1": b"2",  # 4 minutes ago: inside 5 m
        b"s2": b"95", b"c2": b"4",  # 5 minutes ago: outside 5 m, inside 1 h
        b"s3": b"40", b"c3": b"7",  # 60 minutes ago: outside 1 h
        b"s4": b"101", b"c4": b"9",  # in the future (clock skew): not counted
    }  # fmt: skip
    assert window_count(raw, b"c", 100, 5) == 5
    assert window_count(raw, b"c", 100, 60) == 9
    assert window_count({}, b"c", 100, 60) == 0


def test_parse_user_state_decodes_every_field() -> None:
    raw = {
        b"d": struct.pack("<2f", 0.5, -1.0),
        b"dv": b"7",
        b"r": b"i9 i3",
        b"t": b"1772366400123456",
        b"s10": b"10",
        b"c10": b"4",
    }
    state = parse_user_state(raw, now_minute=12)
    assert state.delta_embedding is not None
    assert state.delta_embedding.tolist() == [0.5, -1.0]
    assert state.delta_model_version == "7"
    assert state.recent_items == ("i9", "i3")
    assert (state.count_5m, state.count_1h) == (4, 4)
    assert state.last_event_ts == pytest.approx(1_772_366_400.123456)
    assert parse_user_state({}, 12) == UserRealtimeState(None, None, (), 0, 0, None)


def test_merge_recent_puts_new_items_first_and_keeps_history_positions() -> None:
    # a is in the history already: a repeat does not move it (offline: first positives only).
    assert merge_recent(["x", "a", "y"], ["a", "b", "c"], 4) == ("x", "y", "a", "b")
    assert merge_recent([], ["a", "b"], 5) == ("a", "b")
    assert merge_recent(["x"], [], 5) == ("x",)


def test_assembly_fills_defaults_and_drops_vectors_of_another_bundle() -> None:
    shapes = FeatureShapes(n_categories=2, embedding_dim=3, history_length=3)
    batch: dict[str, list[Any]] = {
        "user_id": ["u1", "u2", "u3"],
        "event_count": [4.0, None, 2.0],
        "category_prefs": [[0.25, 0.75], None, [1.0, 0.0, 0.0]],  # u3: written for 3 categories
        "base_embedding": [[1.0, 2.0, 3.0], None, [1.0]],
        "recent_items": [["a", "b"], None, []],
    }
    delta = np.array([0.1, 0.2, 0.3], np.float32)
    realtime = [
        UserRealtimeState(delta, "v2", ("n",), 1, 2, 10.0),
        UserRealtimeState(delta, "v1", (), 0, 0, None),  # delta from bundle v1
        UserRealtimeState(None, None, (), 0, 0, None),
    ]
    out = assemble_user_features(["u1", "u2", "u3"], batch, realtime, shapes, "v2", False)
    assert out.event_count.tolist() == [4.0, 0.0, 2.0]
    assert out.category_prefs.tolist() == [[0.25, 0.75], [0.0, 0.0], [0.0, 0.0]]
    assert out.has_base_embedding.tolist() == [True, False, False]
    assert out.base_embedding[2].tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_array_equal(out.delta_embedding[0], delta)
    assert out.delta_embedding[1].tolist() == [0.0, 0.0, 0.0]
    assert out.recent_items == (("n", "a", "b"), (), ())
    assert out.count_1h.tolist() == [2, 0, 0]
    assert out.last_event_ts[0] == 10.0 and np.isnan(out.last_event_ts[1])
    assert out.degraded is False


def test_assembly_with_nothing_read_is_all_defaults() -> None:
    shapes = FeatureShapes(n_categories=2, embedding_dim=2, history_length=3)
    out = assemble_user_features(["u1"], None, None, shapes, "v1", True)
    assert out.degraded is True
    assert out.event_count.tolist() == [0.0]
    assert out.category_prefs.shape == (1, 2) and not out.category_prefs.any()
    assert out.delta_embedding.shape == (1, 2) and not out.delta_embedding.any()
    assert out.recent_items == ((),)


def test_the_known_users_file_is_read_only_when_listed_and_only_sorted_unique_keys(
    tmp_path: Path,
) -> None:
    assert load_known_users(tmp_path, {}) is None  # an older bundle: every user known
    keys = known_user_keys(["a", "b", "c"])
    np.save(tmp_path / KNOWN_USERS_FILE, keys, allow_pickle=False)
    loaded = load_known_users(tmp_path, {KNOWN_USERS_FILE: "checked"})
    assert loaded is not None and loaded.tolist() == keys.tolist()
    for bad in (keys[::-1], np.repeat(keys, 2), keys.astype(np.int64)):
        np.save(tmp_path / KNOWN_USERS_FILE, bad, allow_pickle=False)
        with pytest.raises(BundleIntegrityError, match=KNOWN_USERS_FILE):
            load_known_users(tmp_path, {KNOWN_USERS_FILE: "checked"})
