"""Faults under constant open-loop load: does anything fail when a part fails?

Starts `recserve-serve serve` as a child process (its own Ray, on a Redis of this benchmark), sends
recommendations and event batches at fixed rates (open loop), and injects one fault per phase, a few
seconds in:

- `none`: no fault, the reference row;
- `swap`: a new version registered and aliased `champion` (a hot swap; same artifacts, new version,
  so every stage loads it);
- `kill-<Deployment>`: `kill -9` of the deployment's only replica: each stage-hosting deployment of
  the placement (`--placement`: split -> UserTower, Retriever, Ranker, ReRanker; two-tier ->
  Retrieval, Ranking; fused -> the Ingress itself, which hosts the stages), and the EventWriter
  (event batches answer 503 `events_unavailable` with Retry-After until it is back, never a 500);
- `redis`: the Redis server stopped for `--outage` seconds, then started again (append-only file on,
  so what it held survives the restart);
- `stop` (always last): SIGTERM to the server; the processes it started that are alive 10 s later.

Per phase it prints requests, non-2xx, degraded answers, p99 and max latency; for events: sent,
accepted, spooled, refused (non-2xx: the client knows it must retry), lost (accepted but never in the
stream) and duplicated (in the stream more than once), in the stream and in the Parquet files the
real exporter (`training.exporter`) writes from it. JSON goes to bench/results/chaos.json.

    python bench/chaos.py --data-dir /tmp/demo [--placement two-tier]
    # after `recserve train --data-dir /tmp/demo --promote`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_load import (  # noqa: E402
    free_port,
    percentiles,
    ready,
    replica_processes,
    sample_users,
    send_on_schedule,
    write_results,
)


def stage_hosts(placement: Any) -> list[str]:
    """The deployments whose replicas host stages under `placement` (fused: the Ingress)."""
    from serve_app.placement import deployment_names

    return deployment_names(placement) or ["Ingress"]


def default_faults(placement: Any) -> tuple[str, ...]:
    kills = (*(f"kill-{s}" for s in stage_hosts(placement)), "kill-EventWriter")
    return ("none", "swap", *kills, "redis")


EVENTS_PER_BATCH = 5


# --- the parts a fault acts on -------------------------------------------------------------------


class RedisServer:
    """A redis-server of this benchmark that can be stopped and started again on the same port with
    its data (append-only file, fsync on every write)."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is required")
        self.binary, self.directory, self.port = binary, directory, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port)
        wait_for(lambda: _pings(client), 20, "redis-server to start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None


def _pings(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def kill_replica(deployment: str, root: int) -> str:
    """`kill -9` of one replica of `deployment` (its only one, or the first of several: fused runs
    two Ingress replicas)."""
    replicas = replica_processes(deployment, root)
    if not replicas:
        return f"no {deployment} replica found"
    replicas[0].kill()
    return f"kill -9 {deployment} (pid {replicas[0].pid}, 1 of {len(replicas)})"


def swap(tracking_uri: str, settings: Any) -> str:
    """Register the champion's artifacts again as a new version and alias it champion."""
    from mlflow import MlflowClient

    from serve_app.models import ModelSource
    from training.registry import register_bundle

    source = ModelSource.from_settings(settings)
    current = source.resolve("champion")
    path = source.fetch(current)
    new = register_bundle(path, tracking_uri=tracking_uri).version
    MlflowClient(tracking_uri).set_registered_model_alias("recserve", "champion", str(new))
    return f"champion {current} -> {new}"


@contextmanager
def server(
    data_dir: Path, redis_url: str, port: int, num_cpus: int, log: Path, placement: Any
) -> Iterator[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "serve_app.cli", "serve", "--data-dir", str(data_dir)]
    command += ["--redis-url", redis_url, "--port", str(port), "--num-cpus", str(num_cpus)]
    command += ["--poll-interval", "1"]
    command += ["--placement", placement if isinstance(placement, str) else json.dumps(placement)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


def whole(url: str, user: str) -> bool:
    """One answer with no fallback: every stage is back."""
    request = urllib.request.Request(
        f"{url}/v1/recommendations",
        data=json.dumps({"user_id": user, "k": 10}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read()).get("fallback") is None
    except OSError:
        return False


# --- load ----------------------------------------------------------------------------------------


@dataclass
class Phase:
    fault: str
    action: str = ""
    requests: int = 0
    non_2xx: dict[str, int] = field(default_factory=dict)
    degraded: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    events_sent: int = 0
    events_accepted: int = 0
    events_spooled: int = 0
    events_refused: int = 0
    # Refused batches by status and whether they carried Retry-After ("503 retry-after", ...).
    event_refusals: dict[str, int] = field(default_factory=dict)


@dataclass
class EventLedger:
    """Every event id sent, and the ones the server accepted (2xx)."""

    sent: list[str] = field(default_factory=list)
    accepted: set[str] = field(default_factory=set)


async def run_phase(
    url: str,
    phase: Phase,
    users: list[str],
    items: list[str],
    ledger: EventLedger,
    rate: float,
    event_rate: float,
    duration: float,
    fault_at: float,
    fault: Callable[[], str],
) -> None:
    import aiohttp

    from serve_app.events import event_id
    from serve_app.schemas import Event, EventType

    latencies: list[float] = []
    non_2xx: Counter[str] = Counter()
    refusals: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(url, timeout=timeout) as session:

        async def recommend(i: int, scheduled: float) -> None:
            body = {"user_id": users[i % len(users)], "k": 10}
            try:
                async with session.post("/v1/recommendations", json=body) as response:
                    text = await response.text()
                    latencies.append((loop.time() - scheduled) * 1000)
                    if response.status >= 300:
                        non_2xx[f"{response.status} {text[:60]}"] += 1
                    elif json.loads(text).get("fallback") == "degraded":
                        phase.degraded += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                latencies.append((loop.time() - scheduled) * 1000)
                non_2xx[type(exc).__name__] += 1

        async def events(i: int, scheduled: float) -> None:
            batch = []
            for j in range(EVENTS_PER_BATCH):
                n = i * EVENTS_PER_BATCH + j
                event = Event(
                    user_id=users[n % len(users)],
                    item_id=items[n % len(items)],
                    event_type=EventType.CLICK if n % 3 else EventType.VIEW,
                    timestamp=datetime.now(UTC),
                    request_id=uuid.uuid4().hex,
                    event_id=uuid.uuid4().hex,  # what a client that retries sends
                )
                batch.append(event)
            ids = [event_id(e) for e in batch]
            ledger.sent.extend(ids)
            phase.events_sent += len(ids)
            body = {"events": [e.model_dump(mode="json", exclude_none=True) for e in batch]}
            try:
                async with session.post("/v1/events", json=body) as response:
                    payload = await response.json(content_type=None)
                    if response.status < 300:
                        ledger.accepted.update(ids)
                        phase.events_accepted += len(ids)
                        phase.events_spooled += int(payload.get("spooled", 0) or 0)
                    else:
                        phase.events_refused += len(ids)
                        retry = "retry-after" if "Retry-After" in response.headers else "no retry"
                        refusals[f"{response.status} {retry}"] += 1
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                phase.events_refused += len(ids)
                refusals[type(exc).__name__] += 1

        async def inject() -> None:
            await asyncio.sleep(fault_at)
            phase.action = await asyncio.to_thread(fault)

        await asyncio.gather(
            send_on_schedule(rate, int(rate * duration), recommend),
            send_on_schedule(event_rate, int(event_rate * duration), events),
            inject(),
        )
    phase.requests = int(rate * duration)
    phase.non_2xx = dict(non_2xx)
    phase.event_refusals = dict(refusals)
    phase.latency_ms = percentiles(latencies)
    phase.latency_ms["max"] = round(max(latencies, default=0.0), 1)


# --- accounting ----------------------------------------------------------------------------------


def stream_ids(redis_url: str, stream_key: str) -> Counter[str]:
    import redis

    client = redis.Redis.from_url(redis_url)
    ids: Counter[str] = Counter()
    last = "-"
    while True:
        entries = client.xrange(stream_key, min=last, max="+", count=10_000)
        if last != "-":
            entries = entries[1:]
        if not entries:
            return ids
        for _, fields in entries:
            ids[fields[b"event_id"].decode()] += 1
        last = entries[-1][0].decode()


def export_ids(redis_url: str, stream_key: str, out_dir: Path) -> Counter[str]:
    """Drain the stream into Parquet with the real exporter (training.exporter), then count each
    event id in the files it wrote."""
    import pyarrow.parquet as pq
    import redis

    from training.exporter import ExporterConfig, StreamExporter

    config = ExporterConfig(redis_url=redis_url, stream_key=stream_key, out_dir=out_dir)
    StreamExporter(redis.Redis.from_url(redis_url), config).drain()
    ids: Counter[str] = Counter()
    for part in sorted(out_dir.glob("date=*/part-*.parquet")):
        ids.update(str(e) for e in pq.read_table(part, columns=["event_id"]).column(0).to_pylist())
    return ids


def leftover(pids: list[int]) -> list[str]:
    import psutil

    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {' '.join(process.cmdline())[:60]}")
        except psutil.NoSuchProcess:
            continue
    return alive


def print_table(phases: list[Phase], events: dict[str, int], stop: dict[str, Any]) -> None:
    print()
    header = (
        f"{'fault':<16} {'requests':>8} {'non-2xx':>8} {'degraded':>8} {'p99 ms':>8} {'max ms':>8}"
    )
    print(header + f" {'ev sent':>8} {'accepted':>8} {'spooled':>8} {'refused':>8}")
    for p in phases:
        row = f"{p.fault:<16} {p.requests:>8} {sum(p.non_2xx.values()):>8} {p.degraded:>8} "
        row += f"{p.latency_ms.get('p99', 0):>8.1f} {p.latency_ms.get('max', 0):>8.1f} "
        row += f"{p.events_sent:>8} {p.events_accepted:>8} {p.events_spooled:>8} "
        print(row + f"{p.events_refused:>8}")
    print()
    print(
        "events: sent {sent}, accepted {accepted}, spooled {spooled}, refused {refused}, "
        "lost {lost}, duplicated {duplicated} (in the stream); exported Parquet: lost "
        "{lost_in_parquet}, duplicated {duplicated_in_parquet}".format(**events)
    )
    print(
        f"stop: exit code {stop['exit_code']} after {stop['seconds']:.1f} s; "
        f"{len(stop['left'])} of {stop['processes']} processes left 10 s after SIGTERM"
    )
    for phase in phases:
        if phase.non_2xx:
            print(f"  {phase.fault}: {phase.non_2xx}")
        if phase.event_refusals:
            print(f"  {phase.fault} event batches refused: {phase.event_refusals}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="trained data dir (registry)")
    parser.add_argument("--rate", type=float, default=30.0, help="recommendations per second")
    parser.add_argument("--event-rate", type=float, default=6.0, help="event batches per second")
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of load per fault")
    parser.add_argument("--fault-at", type=float, default=10.0, help="seconds into each phase")
    parser.add_argument("--outage", type=float, default=20.0, help="seconds Redis stays down")
    parser.add_argument(
        "--placement",
        default="split",
        help="how the stages are grouped (split, two-tier, fused, or a JSON list of groups)",
    )
    parser.add_argument(
        "--faults",
        default=None,
        help="comma list (stop always runs last); default: none, swap, a kill of each "
        "stage-hosting deployment of the placement, redis",
    )
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/chaos.json")
    args = parser.parse_args(argv)

    from serve_app.config import ServeSettings
    from serve_app.placement import parse_placement, resolve_placement

    placement = parse_placement(args.placement)
    resolve_placement(placement)  # a bad one fails before anything starts
    data_dir = args.data_dir.resolve()
    faults_arg = args.faults or ",".join(default_faults(placement))
    faults = [f for f in faults_arg.split(",") if f and f != "stop"]
    users = sample_users(data_dir, 200, 0.1, seed=7)
    known = next(u for u in users if not u.startswith("cold-"))
    import pandas as pd

    profile = pd.read_parquet(data_dir / "features" / "item_profile.parquet", columns=["item_id"])
    items = [str(i) for i in profile["item_id"].head(500)]
    with tempfile.TemporaryDirectory(prefix="recserve-chaos-") as tmp:
        redis_server = RedisServer(Path(tmp))
        redis_server.start()
        settings = ServeSettings(
            feature_store={"data_dir": str(data_dir)}, redis_url=redis_server.url
        )
        tracking_uri = settings.tracking_uri
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "server.log"
        ledger = EventLedger()
        phases: list[Phase] = []
        try:
            with server(data_dir, redis_server.url, port, args.num_cpus, log, placement) as process:
                wait_for(lambda: process.poll() is None and ready(url), 300, "the graph", 1.0)
                print(f"serving at {url}; log {log}", flush=True)

                def outage() -> str:
                    redis_server.stop()
                    time.sleep(args.outage)  # the fault itself lasts this long
                    redis_server.start()
                    return f"redis down {args.outage:.0f} s"

                actions: dict[str, Callable[[], str]] = {
                    "none": lambda: "no fault (the reference)",
                    "swap": lambda: swap(tracking_uri, settings),
                    "redis": outage,
                    **{
                        f"kill-{s}": (lambda s=s: kill_replica(s, process.pid))
                        for s in (*stage_hosts(placement), "EventWriter")
                    },
                }
                for name in faults:
                    phase = Phase(name)
                    asyncio.run(
                        run_phase(
                            url,
                            phase,
                            users,
                            items,
                            ledger,
                            args.rate,
                            args.event_rate,
                            args.duration,
                            args.fault_at,
                            actions[name],
                        )
                    )
                    phases.append(phase)
                    print(f"{name}: {phase.action}; {phase}", flush=True)
                    wait_for(lambda: whole(url, known), 120, "whole answers again", 1.0)

                # Accepted events reach the stream (a spool replays once Redis is back).
                key = settings.event_log.stream_key
                try:
                    wait_for(
                        lambda: ledger.accepted <= set(stream_ids(redis_server.url, key)),
                        60,
                        "the accepted events in the stream",
                        1.0,
                    )
                except SystemExit as exc:
                    print(exc, flush=True)
                in_stream = stream_ids(redis_server.url, key)
                exported = export_ids(redis_server.url, key, Path(tmp) / "events_log")

                import psutil

                pids = [c.pid for c in psutil.Process(process.pid).children(recursive=True)]
                start = time.monotonic()
                process.send_signal(signal.SIGTERM)
                code = process.wait(timeout=60)
                seconds = time.monotonic() - start
                time.sleep(max(0.0, 10.0 - seconds))  # the bar: nothing left 10 s after SIGTERM
                stop = {"exit_code": code, "seconds": seconds, "processes": len(pids)}
                stop["left"] = leftover(pids)
        finally:
            redis_server.stop()
    events = {
        "sent": len(ledger.sent),
        "accepted": len(ledger.accepted),
        "spooled": sum(p.events_spooled for p in phases),
        "refused": sum(p.events_refused for p in phases),
        "lost": len(ledger.accepted - set(in_stream)),
        "duplicated": sum(n - 1 for n in in_stream.values() if n > 1),
        "lost_in_parquet": len(ledger.accepted - set(exported)),
        "duplicated_in_parquet": sum(n - 1 for n in exported.values() if n > 1),
    }
    print_table(phases, events, stop)
    results = {
        "placement": placement,
        "rate": args.rate,
        "event_rate": args.event_rate,
        "events_per_batch": EVENTS_PER_BATCH,
        "duration_s": args.duration,
        "phases": [asdict(p) for p in phases],
        "events": events,
        "stop": stop,
    }
    write_results(args.json, "chaos.py", argv or sys.argv[1:], results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
