"""Event spool: the EventWriter's local append-only log of accepted events while Redis is unavailable.

`EventSpool` is the file (JSON lines, fsync'd per batch, bounded in bytes, a replay cursor beside it);
`SpooledLog` decides per batch between Redis and the spool and replays the spool in order when Redis
answers again. Deduplication is Redis's: every event id leaves a `seen` marker there (the write
script's SET NX), so a replay cut short by a crash is resumed from the cursor and whatever it sends
twice is skipped; the spool itself only refuses an id it already holds.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Generic, TypeVar

from pydantic import ValidationError

from serve_app.errors import FeatureStoreUnavailable, SpoolFull
from serve_app.events import event_id
from serve_app.schemas import Event

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Slots: one spool file per live EventWriter replica sharing a directory, claimed with flock; a
# restarted replica claims a free slot, the one a dead replica held first, and replays it.
MAX_SLOTS = 64
# Ids of the latest spooled events kept in memory, so that a client's retry during the outage is not
# spooled twice (~110 bytes each). Older retries are spooled again and skipped by Redis at replay.
RECENT_IDS = 100_000


# --- records ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpoolRecord:
    event_id: str
    event: Event


def encode_record(eid: str, event: Event) -> bytes:
    """One JSON line: format version, event id, the event (JSON, never pickle)."""
    body = {"v": FORMAT_VERSION, "id": eid, "event": event.model_dump(mode="json")}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def decode_record(line: bytes) -> SpoolRecord:
    """The record of one line; ValueError when it is torn or damaged. The id is a content hash of
    the event, so a changed byte in the event is caught here too."""
    try:
        body = json.loads(line)
        event = Event.model_validate(body["event"])
        eid = body["id"]
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise ValueError(f"not a spool record: {exc}") from None
    if not isinstance(eid, str) or body.get("v") != FORMAT_VERSION or event_id(event) != eid:
        raise ValueError("spool record does not match its event id")
    return SpoolRecord(eid, event)


# --- the file --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpoolChunk:
    """Records read from the cursor on, and the offset just past them (what `commit` takes)."""

    records: tuple[SpoolRecord, ...]
    end: int
    corrupt: int  # damaged lines skipped (only a disk fault makes one before the last line)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EventSpool:
    """One replica's spool: `slot-<n>.jsonl` plus `slot-<n>.cursor` (the offset replayed up to) in
    `directory`, held under an exclusive flock on `slot-<n>.lock`. Thread-safe."""

    def __init__(
        self,
        directory: Path,
        slot: int,
        lock: IO[bytes],
        max_bytes: int,
        retry_after_seconds: int = 5,
    ) -> None:
        self.directory = directory
        self.slot = slot
        self.max_bytes = max_bytes
        self.retry_after_seconds = retry_after_seconds
        self.path = directory / f"slot-{slot}.jsonl"
        self._cursor_path = directory / f"slot-{slot}.cursor"
        self._lock_file = lock
        self._mutex = threading.Lock()
        self._file = open(self.path, "ab+")  # noqa: SIM115 - held open for the spool's life
        self._ids: set[str] = set()  # the last RECENT_IDS spooled, oldest first in _order
        self._order: deque[str] = deque()
        self._pending = 0  # events after the cursor
        self._size = 0
        self._cursor = 0
        self.torn_bytes = 0  # torn tail dropped at open (a crash in the middle of an append)
        self._recover()

    @classmethod
    def open(cls, directory: Path, max_bytes: int, retry_after_seconds: int = 5) -> EventSpool:
        """Claim the first free slot in `directory` (created if missing) and recover its file."""
        directory.mkdir(parents=True, exist_ok=True)
        for slot in range(MAX_SLOTS):
            spool = cls.claim(directory, slot, max_bytes, retry_after_seconds)
            if spool is not None:
                return spool
        raise RuntimeError(f"all {MAX_SLOTS} spool slots in {directory} are held")

    @classmethod
    def claim(
        cls, directory: Path, slot: int, max_bytes: int, retry_after_seconds: int = 5
    ) -> EventSpool | None:
        """The spool of `slot` if no live process holds it, else None."""
        lock = open(directory / f"slot-{slot}.lock", "wb")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return None
        return cls(directory, slot, lock, max_bytes, retry_after_seconds)

    def _recover(self) -> None:
        """Drop a torn last line, read the cursor and the ids the file holds."""
        self._file.seek(0)
        data = self._file.read()
        good = data.rfind(b"\n") + 1  # a line without its newline was never fsync'd whole
        last_start = data.rfind(b"\n", 0, good - 1) + 1 if good else 0
        if good:
            try:
                decode_record(data[last_start:good])
            except ValueError:  # the last whole line is damaged too: a torn write
                good = last_start
        if good < len(data):
            self.torn_bytes = len(data) - good
            logger.warning(
                "event spool %s: dropped a torn tail of %d bytes", self.path, self.torn_bytes
            )
            self._file.truncate(good)
            os.fsync(self._file.fileno())
        self._size = good
        cursor = self._read_cursor()
        # Past the end: the file was emptied and the process died before resetting the cursor.
        self._cursor = cursor if cursor <= good else 0
        for offset, line in _lines(data[:good]):
            try:
                record = decode_record(line)
            except ValueError:
                continue  # counted when the replay reaches it
            self._remember(record.event_id)
            if offset >= self._cursor:
                self._pending += 1

    def _remember(self, eid: str) -> None:
        if eid in self._ids:
            return
        self._ids.add(eid)
        self._order.append(eid)
        if len(self._order) > RECENT_IDS:
            self._ids.discard(self._order.popleft())

    def _read_cursor(self) -> int:
        try:
            offset = json.loads(self._cursor_path.read_text(encoding="utf-8"))["offset"]
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError):
            logger.warning("event spool cursor %s unreadable: replaying from 0", self._cursor_path)
            return 0  # a replay from the start is safe: Redis skips the ids it has seen
        return int(offset) if isinstance(offset, int) and offset >= 0 else 0

    def _write_cursor(self, offset: int) -> None:
        tmp = self._cursor_path.with_suffix(".cursor.tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(json.dumps({"offset": offset}))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._cursor_path)
        _fsync_dir(self.directory)

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def pending(self) -> int:
        """Events spooled and not replayed yet."""
        return self._pending

    @property
    def has_pending(self) -> bool:
        """Bytes after the cursor (events, or damaged lines the replay has yet to step over)."""
        return self._cursor < self._size

    def append(self, records: Sequence[tuple[str, Event]]) -> tuple[int, int]:
        """Append the records whose id is not among the latest spooled, in one fsync'd write:
        (events spooled, duplicates skipped). SpoolFull, with nothing written, when they would not fit."""
        with self._mutex:
            lines, fresh = [], set()
            for eid, event in records:
                if eid in self._ids or eid in fresh:
                    continue
                fresh.add(eid)
                lines.append(encode_record(eid, event))
            blob = b"".join(lines)
            if self._size + len(blob) > self.max_bytes:
                raise SpoolFull(
                    f"event spool full ({self._size} of {self.max_bytes} bytes) while the event "
                    "log is unavailable: events not accepted",
                    self.retry_after_seconds,
                )
            if blob:
                try:
                    self._file.seek(0, os.SEEK_END)
                    self._file.write(blob)
                    self._file.flush()
                    os.fsync(self._file.fileno())
                except OSError as exc:  # disk full or failing: leave the file as it was
                    self._file.truncate(self._size)
                    raise SpoolFull(
                        f"event spool not writable ({exc}): events not accepted",
                        self.retry_after_seconds,
                    ) from exc
                self._size += len(blob)
                self._pending += len(lines)
                for eid, _ in records:
                    if eid in fresh:
                        self._remember(eid)
            return len(lines), len(records) - len(lines)

    def read(self, max_events: int) -> SpoolChunk:
        """Up to `max_events` records from the cursor on (the cursor does not move)."""
        with self._mutex:
            start, size = self._cursor, self._size
        records: list[SpoolRecord] = []
        corrupt = 0
        with open(self.path, "rb") as src:
            src.seek(start)
            end = start
            while len(records) < max_events and end < size:
                line = src.readline()
                if not line:
                    break
                try:
                    records.append(decode_record(line))
                except ValueError:
                    corrupt += 1
                    logger.error(
                        "event spool %s: damaged record at byte %d skipped", self.path, end
                    )
                end += len(line)
        return SpoolChunk(tuple(records), end, corrupt)

    def commit(self, chunk: SpoolChunk) -> bool:
        """Mark `chunk` replayed; once the cursor reaches the end, empty the file. True: emptied."""
        with self._mutex:
            self._pending = max(0, self._pending - len(chunk.records))
            if chunk.end < self._size:
                self._cursor = chunk.end
                self._write_cursor(chunk.end)
                return False
            # Truncate first: a crash before the cursor is reset leaves a cursor past the end,
            # which the next open clamps to 0.
            self._file.truncate(0)
            os.fsync(self._file.fileno())
            self._write_cursor(0)
            self._size = self._cursor = self._pending = 0
            self._ids.clear()
            self._order.clear()
            return True

    def close(self) -> None:
        self._file.close()
        self._lock_file.close()  # releases the flock: another replica may take the slot


def _lines(data: bytes) -> list[tuple[int, bytes]]:
    out, offset = [], 0
    for line in data.splitlines(keepends=True):
        out.append((offset, line))
        offset += len(line)
    return out


# --- Redis or the spool ----------------------------------------------------------------------------


T = TypeVar("T")  # what `apply` reports for a batch written to Redis


@dataclass(frozen=True)
class SpoolOutcome(Generic[T]):
    """A batch written to Redis (`result`) or to the spool (`spooled` events, `duplicates` the
    spool already held)."""

    result: T | None
    spooled: int = 0
    duplicates: int = 0


@dataclass(frozen=True)
class ReplayStep(Generic[T]):
    events: int
    result: T | None
    corrupt: int
    emptied: bool


class SpooledLog(Generic[T]):
    """Writes go to Redis (`apply`, which raises FeatureStoreUnavailable when it is down) while the
    spool is empty, and to the spool while Redis fails or the spool holds events, so that order is
    kept; `replay_step` moves the spool's oldest events into Redis through the same `apply`."""

    def __init__(
        self, spool: EventSpool, apply: Callable[[list[Event]], T], replay_batch: int
    ) -> None:
        self.spool = spool
        self._apply = apply
        self._replay_batch = replay_batch

    def write(self, events: Sequence[Event]) -> SpoolOutcome[T]:
        """SpoolFull when Redis is unavailable and the batch does not fit."""
        events = list(events)
        if not self.spool.has_pending:
            try:
                return SpoolOutcome(self._apply(events))
            except FeatureStoreUnavailable as exc:
                # Some may be applied already: their ids are in Redis and the replay skips them.
                logger.warning("event log unavailable, spooling %d events: %s", len(events), exc)
        spooled, duplicates = self.spool.append([(event_id(e), e) for e in events])
        return SpoolOutcome(None, spooled, duplicates)

    def replay_step(self) -> ReplayStep[T] | None:
        """Replay the next chunk; None when the spool is empty. FeatureStoreUnavailable when Redis
        is still down (the cursor stays: the chunk is sent again next time)."""
        if not self.spool.has_pending:
            return None
        chunk = self.spool.read(self._replay_batch)
        result = self._apply([r.event for r in chunk.records]) if chunk.records else None
        emptied = self.spool.commit(chunk)
        return ReplayStep(len(chunk.records), result, chunk.corrupt, emptied)


def replay_orphans(
    directory: Path,
    own_slot: int,
    apply: Callable[[list[Event]], T],
    replay_batch: int,
    on_step: Callable[[ReplayStep[T]], None] = lambda step: None,
) -> int:
    """Replay the spools no live replica holds (left by a replica that was scaled away) and empty
    them; the events replayed. A slot whose replay fails (Redis down) is released and tried again
    at the next call."""
    replayed = 0
    for path in sorted(directory.glob("slot-*.jsonl")):
        slot = int(path.stem.partition("-")[2])
        if slot == own_slot or path.stat().st_size == 0:
            continue
        spool = EventSpool.claim(directory, slot, 1 << 62)  # no bound: nothing is appended
        if spool is None:
            continue  # a live replica's own
        try:
            log = SpooledLog(spool, apply, replay_batch)
            while (step := log.replay_step()) is not None:
                replayed += step.events
                on_step(step)
            logger.info("event spool slot %d of a departed replica replayed", slot)
        except FeatureStoreUnavailable:
            pass
        finally:
            spool.close()
    return replayed


async def replay_forever(
    log: SpooledLog[T],
    wake: asyncio.Event,
    probe_seconds: float,
    on_step: Callable[[ReplayStep[T]], None] = lambda step: None,
    probe: Callable[[], None] | None = None,
) -> None:
    """Replay whenever the spool holds events: at once while Redis answers; after a failure, every
    `probe_seconds` `probe` (a cheap round trip raising FeatureStoreUnavailable; None: the replay
    itself) until Redis answers, so a hung Redis is not sent chunks it would run on waking up.
    Sleeps on `wake` (set after a batch was spooled) when the spool is empty."""
    down = False
    while True:
        try:
            if down and probe is not None:
                await asyncio.to_thread(probe)
            down = False
            step = await asyncio.to_thread(log.replay_step)
        except FeatureStoreUnavailable:
            down = True
            await asyncio.sleep(probe_seconds)
            continue
        except Exception:  # keep the loop alive: the spool stays, the next probe retries
            logger.exception("event spool replay failed")
            await asyncio.sleep(probe_seconds)
            continue
        if step is None:
            wake.clear()
            if not log.spool.has_pending:
                await wake.wait()
            continue
        on_step(step)
