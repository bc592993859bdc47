"""Real-time write path of the event endpoint: log each event to the Redis Stream, update its features.

One Lua script per event does, atomically: skip the event if its id was seen (idempotent retries: the
client's `event_id`, else the content; `event_id()`, remembered `dedupe_ttl_seconds`), XADD it to
the stream (the durable log `training.exporter` drains; capped by `stream_maxlen`, MAXLEN ~), then
update the user's hash (delta embedding EMA, bounded recent list, one-minute counter slots, last event
time) and the item's counters; a user the served bundle never saw in training (cold) gets a shorter
expiry (`user_ttl_seconds`). Atomic scripts mean concurrent events for one user never lose an update
and the state always equals a serial replay of the stream in stream order. Failures raise `FeatureStoreUnavailable` (the
ingress answers 503, or the EventWriter spools the batch: `serve_app.spool`): never dropped silently.

The script touches four keys in different hash slots, so it needs a single Redis (or Sentinel); on Redis
Cluster it would be split per slot (log, user, item), each part idempotent through its own marker.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np
import redis

from serve_app.config import EventLogConfig, RealtimeConfig, ServeSettings
from serve_app.contract import is_known_user
from serve_app.errors import FeatureStoreUnavailable
from serve_app.features import (
    US_PER_MINUTE,
    WINDOW_SLOTS,
    connect_redis,
    item_state_key,
    user_state_key,
)
from serve_app.schemas import POSITIVE_EVENT_TYPES, STREAM_FIELDS, Event, EventType

if TYPE_CHECKING:  # the bundle module imports FAISS and XGBoost: not needed to write events
    from serve_app.bundle import Bundle

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# KEYS: 1 dedupe marker, 2 stream, 3 user hash, 4 item hash.
# ARGV: 1 dedupe ttl, 2 stream maxlen (0: none), 3..10 the STREAM_FIELDS values, 11 minute,
#       12 positive (0/1), 13 view (0/1), 14 alpha, 15 item vector (float32 LE bytes, may be empty),
#       16 model version, 17 history length, 18 user ttl, 19 item ttl.
_SCRIPT = f"""
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local fields = {{}}
local names = {{{", ".join(f"'{f}'" for f in STREAM_FIELDS)}}}
for k = 1, #names do fields[#fields + 1] = names[k]; fields[#fields + 1] = ARGV[k + 2] end
if ARGV[2] ~= '0' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
else
  redis.call('XADD', KEYS[2], '*', unpack(fields))
end

local user, item, item_id = KEYS[3], KEYS[4], ARGV[5]
local minute = tonumber(ARGV[11])
local slot = tostring(minute % {WINDOW_SLOTS})
-- Ring of one-minute slots: a slot holding an older minute is reset; an event older than the
-- slot's minute is over an hour late and no longer counted.
local function bump(key, counter, other)
  local held = tonumber(redis.call('HGET', key, 's' .. slot) or '-1')
  if minute > held then
    redis.call('HSET', key, 's' .. slot, minute, counter .. slot, 1)
    if other then redis.call('HSET', key, other .. slot, 0) end
  elseif minute == held then
    redis.call('HINCRBY', key, counter .. slot, 1)
  end
end

bump(user, 'c', nil)
local ts = tonumber(ARGV[7])
local last = tonumber(redis.call('HGET', user, 't') or '-1')
if ts > last then redis.call('HSET', user, 't', ARGV[7]) end

if ARGV[12] == '1' then
  -- Recent items: a new item goes first, a repeat keeps its place (offline: first positives).
  local known = redis.call('HGET', user, 'r') or ''
  local kept, seen = {{item_id}}, false
  for id in string.gmatch(known, '%S+') do
    if id == item_id then seen = true; break end
    if #kept < tonumber(ARGV[17]) then kept[#kept + 1] = id end
  end
  if not seen then redis.call('HSET', user, 'r', table.concat(kept, ' ')) end
  bump(item, 'c', 'v')
elseif ARGV[13] == '1' then
  bump(item, 'v', 'c')
end

local alpha, vec = tonumber(ARGV[14]), ARGV[15]
if alpha > 0 and #vec > 0 then
  local old = redis.call('HGET', user, 'd')
  local same = old and #old == #vec and redis.call('HGET', user, 'dv') == ARGV[16]
  local keep, out = 1 - alpha, {{}}
  for j = 0, #vec / 4 - 1 do
    local o = 0
    if same then o = struct.unpack('<f', old, 4 * j + 1) end
    out[j + 1] = struct.pack('<f', keep * o + alpha * struct.unpack('<f', vec, 4 * j + 1))
  end
  redis.call('HSET', user, 'd', table.concat(out), 'dv', ARGV[16])
end
redis.call('EXPIRE', user, ARGV[18])
if ARGV[12] == '1' or ARGV[13] == '1' then redis.call('EXPIRE', item, ARGV[19]) end
return 1
"""


# --- pure logic -------------------------------------------------------------------------------


def timestamp_us(moment: datetime) -> int:
    """Exact microseconds since the epoch (no float rounding)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def event_id(event: Event) -> str:
    """The id an event is logged and deduplicated under (the stream's and Parquet's `event_id`).

    With a client `event_id` (its idempotency key): a digest of the user and that id, so a retry
    is recognised whatever else it carries, and two users' ids never collide. Without one: a digest
    of the content, so a retry is recognised only if it repeats every field, the timestamp
    included; the timestamp defaults to the server's time, so a retry without `event_id` or
    `timestamp` counts twice: clients that retry send an `event_id`."""
    if event.event_id is not None:
        scoped = f"{len(event.user_id)}:{event.user_id}|{event.event_id}"
        return "e" + hashlib.blake2b(scoped.encode(), digest_size=16).hexdigest()
    key = "|".join(
        (
            event.user_id,
            event.item_id,
            event.event_type.value,
            str(timestamp_us(event.timestamp)),
            event.request_id or "",
            "" if event.position is None else str(event.position),
            event.session_id or "",
        )
    )
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def stream_entry(event: Event, eid: str) -> dict[str, str]:
    """The stream entry of an event, field by field (STREAM_FIELDS order)."""
    return {
        "event_id": eid,
        "user_id": event.user_id,
        "item_id": event.item_id,
        "event_type": event.event_type.value,
        "timestamp_us": str(timestamp_us(event.timestamp)),
        "position": "" if event.position is None else str(event.position),
        "session_id": event.session_id or "",
        "request_id": event.request_id or "",
    }


def event_alpha(event_type: EventType, weights: Mapping[EventType, float], rate: float) -> float:
    """EMA step of one event: `rate` scaled by the event type's weight, capped at 1."""
    return min(1.0, rate * weights.get(event_type, 0.0))


def ema_update(delta: np.ndarray | None, item_vector: np.ndarray, alpha: float) -> np.ndarray:
    """One EMA step toward an item embedding; None (no state yet) starts from zero, so the delta's
    norm grows with evidence. Float64 arithmetic rounded to float32, exactly as the Lua script."""
    old = np.zeros(len(item_vector)) if delta is None else delta.astype(np.float64)
    return ((1.0 - alpha) * old + alpha * item_vector.astype(np.float64)).astype(np.float32)


@dataclass(frozen=True)
class ItemEmbeddings:
    """The served bundle's item vectors: the space delta embeddings live in, and its version."""

    model_version: str
    item_index: Mapping[str, int]
    vectors: np.ndarray  # float32 [n, d]
    # The bundle's training users (`contract.known_user_keys`); None: the bundle has no list and
    # every user counts as known.
    known_users: np.ndarray | None = None

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> ItemEmbeddings:
        return cls(bundle.version or "", bundle.item_index, bundle.item_embeddings)

    def knows(self, user_id: str) -> bool:
        """Whether the bundle's training data held `user_id` (True without a list)."""
        return self.known_users is None or is_known_user(self.known_users, user_id)

    def vector_bytes(self, item_id: str) -> bytes:
        """Little-endian float32 bytes of an item's vector; empty for an item the bundle lacks."""
        row = self.item_index.get(item_id)
        return b"" if row is None else self.vectors[row].astype("<f4").tobytes()


def user_ttl_seconds(
    realtime: RealtimeConfig, embeddings: ItemEmbeddings | None, user_id: str
) -> int:
    """Expiry of a user's real-time state after this event: the long one for a user of the
    served bundle's training data, `cold_user_ttl_seconds` for anyone else. Without a bundle
    (none served yet) or a bundle without a known-users list, every user is known."""
    if embeddings is None or embeddings.knows(user_id):
        return realtime.user_state_ttl_seconds
    return realtime.cold_user_ttl_seconds


@dataclass(frozen=True)
class WriteResult:
    """Per event, in request order: its id and whether it was applied (False: a duplicate)."""

    event_ids: tuple[str, ...]
    applied: tuple[bool, ...]

    @property
    def accepted(self) -> int:
        return sum(self.applied)

    @property
    def duplicates(self) -> int:
        return len(self.applied) - self.accepted


def stream_id_ms(stream_id: bytes | str) -> int:
    """The millisecond part of a stream entry id (`<ms>-<seq>`, Redis server time at XADD)."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    return int(text.partition("-")[0])


@dataclass(frozen=True)
class GroupBacklog:
    """One consumer group's backlog on the stream."""

    name: str
    undelivered: int | None  # entries not yet delivered (XINFO lag; None when Redis cannot tell)
    pending: int  # delivered, not acknowledged
    oldest_unacked_ms: int | None  # stream time of the oldest entry not acknowledged; None: none


@dataclass(frozen=True)
class StreamStats:
    length: int
    now_ms: int  # Redis server time, the clock stream ids are made of
    groups: tuple[GroupBacklog, ...]

    def lag_seconds(self, group: GroupBacklog) -> float:
        """Age of the group's oldest unacknowledged entry; 0 when it is caught up."""
        if group.oldest_unacked_ms is None:
            return 0.0
        return max(0, self.now_ms - group.oldest_unacked_ms) / 1000.0


def oldest_unacked_ms(
    pending_min: bytes | str | None, next_undelivered: bytes | str | None
) -> int | None:
    """The older of a group's oldest pending entry and its next undelivered one (ids or None)."""
    stamps = [stream_id_ms(i) for i in (pending_min, next_undelivered) if i is not None]
    return min(stamps) if stamps else None


# --- the writer -------------------------------------------------------------------------------


class EventLogWriter:
    """Appends validated events to the stream and updates real-time features, one round trip per
    call (a pipeline of script calls)."""

    def __init__(self, client: redis.Redis, realtime: RealtimeConfig, log: EventLogConfig) -> None:
        self._client = client
        self._realtime = realtime
        self._log = log
        self._script = client.register_script(_SCRIPT)

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> EventLogWriter:
        client = connect_redis(settings.event_redis_url, settings.redis_timeout_seconds)
        return cls(client, settings.realtime, settings.event_log)

    def _args(
        self, event: Event, eid: str, embeddings: ItemEmbeddings | None
    ) -> list[bytes | str | int]:
        rt, log = self._realtime, self._log
        entry = stream_entry(event, eid)
        vector = embeddings.vector_bytes(event.item_id) if embeddings is not None else b""
        return [
            log.dedupe_ttl_seconds,
            log.stream_maxlen or 0,
            *(entry[f] for f in STREAM_FIELDS),
            timestamp_us(event.timestamp) // US_PER_MINUTE,
            int(event.event_type in POSITIVE_EVENT_TYPES),
            int(event.event_type == EventType.VIEW),
            # repr round-trips exactly, so Lua's tonumber sees the same double as ema_update.
            repr(event_alpha(event.event_type, rt.event_weights, rt.ema_rate)),
            vector,
            embeddings.model_version if embeddings is not None else "",
            rt.history_length,
            user_ttl_seconds(rt, embeddings, event.user_id),
            rt.item_state_ttl_seconds,
        ]

    def write(
        self, events: Sequence[Event], embeddings: ItemEmbeddings | None = None
    ) -> WriteResult:
        """Log and apply `events` in order; raise FeatureStoreUnavailable if Redis fails.

        After a failure some events may already be applied: retrying the whole call is safe (the
        applied ones are recognised by id and skipped) for as long as `dedupe_ttl_seconds`.
        """
        ids = [event_id(e) for e in events]
        if not events:
            return WriteResult((), ())
        stream, prefix = self._log.stream_key, self._realtime.key_prefix
        try:
            pipe = self._client.pipeline(transaction=False)
            for event, eid in zip(events, ids, strict=True):
                keys = [
                    f"{stream}:seen:{eid}",
                    stream,
                    user_state_key(prefix, event.user_id),
                    item_state_key(prefix, event.item_id),
                ]
                self._script(keys=keys, args=self._args(event, eid, embeddings), client=pipe)
            replies = pipe.execute()
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(
                f"event log unavailable, events not accepted: {exc}"
            ) from exc
        return WriteResult(tuple(ids), tuple(bool(r) for r in replies))

    def ping(self) -> None:
        """One round trip; FeatureStoreUnavailable when Redis does not answer."""
        try:
            self._client.ping()
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"event log unavailable: {exc}") from exc

    def stream_stats(self) -> StreamStats:
        """Length of the stream and the backlog of each consumer group (raises redis errors)."""
        client, stream = self._client, self._log.stream_key
        seconds, micros = client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        if not client.exists(stream):
            return StreamStats(0, now_ms, ())
        groups = []
        for info in client.xinfo_groups(stream):
            name = info["name"].decode() if isinstance(info["name"], bytes) else str(info["name"])
            pending = int(info["pending"])
            pending_min = client.xpending(stream, name)["min"] if pending else None
            last = info["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else str(last)
            after = client.xrange(stream, min=f"({last}", count=1)
            lag = info.get("lag")
            groups.append(
                GroupBacklog(
                    name=name,
                    undelivered=None if lag is None else int(lag),
                    pending=pending,
                    oldest_unacked_ms=oldest_unacked_ms(
                        pending_min, after[0][0] if after else None
                    ),
                )
            )
        return StreamStats(int(client.xlen(stream)), now_ms, tuple(groups))
