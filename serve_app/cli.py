"""`recserve-serve` command line: serve an existing registry, run the local demo, print the Serve config.

Thin: flags become `AppArgs`; Ray and Serve are started here, and stopped cleanly on Ctrl-C or SIGTERM.
`demo` expects what `recserve train --promote` leaves in the data dir (a registered champion and the
feature tables): it applies and materializes the features, makes sure a Redis answers (starting a
private one in the data dir if none does), serves, sends one request and one event, and prints curls
and the `/demo` page's URL. Both say whether API keys are required (`api.auth`, off unless set:
docs/security.md); `keys hash` turns a key into a keys-file entry (`serve_app.auth`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from serve_app.auth import Scope, add_key_commands
from serve_app.config import (
    DEFAULT_REDIS_URL,
    ApiConfig,
    ServeSettings,
    deployment_options,
    serve_config,
)
from serve_app.placement import (
    PlacementError,
    describe_placement,
    parse_placement,
    resolve_placement,
)

logger = logging.getLogger("recserve.serve")

APP_NAME = "recserve"


# --- argument handling ---------------------------------------------------------------------------


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, nested dicts merged key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def settings_file(path: Path | None) -> dict[str, Any]:
    """ServeSettings fields from a YAML file (e.g. an `experiment:` section); SystemExit naming the
    file and the field when it is not valid."""
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"--settings {path}: {exc}") from None
    if not isinstance(loaded, dict):
        raise SystemExit(f"--settings {path}: expected a mapping of ServeSettings fields")
    try:
        ServeSettings(**loaded)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SystemExit(f"--settings {path}: {where}: {first['msg']}") from None
    return loaded


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """ServeSettings fields from --settings FILE, then flags over it (everything else comes from
    RECSERVE_* variables, which these override)."""
    out: dict[str, Any] = {}
    if args.data_dir is not None:
        out["feature_store"] = {"data_dir": str(args.data_dir)}
    models: dict[str, Any] = {}
    if args.model_uri:
        models["uri"] = args.model_uri
    if args.tracking_uri:
        models["tracking_uri"] = args.tracking_uri
    if args.poll_interval is not None:
        models["poll_interval_seconds"] = args.poll_interval
    if models:
        out["models"] = models
    if args.redis_url:
        out["redis_url"] = args.redis_url
    if getattr(args, "placement", None) is not None:
        out["placement"] = args.placement
    return _merge(settings_file(getattr(args, "settings", None)), out)


def placement_arg(value: str) -> str | list[list[str]]:
    """--placement: a preset or a JSON list of groups, validated (argparse names the flag)."""
    try:
        parsed = parse_placement(value)
        resolve_placement(parsed)
    except PlacementError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return parsed


def _free_to_bind(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def holder_of(port: int) -> str | None:
    """'haproxy (pid 123)': the process listening on TCP `port`, when this user may see it."""
    import psutil

    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return None
            try:
                return f"{psutil.Process(conn.pid).name()} (pid {conn.pid})"
            except psutil.Error:
                return f"pid {conn.pid}"
    return None


def port_in_use_message(host: str, port: int, what: str) -> str:
    """What to tell the user when `port` is taken, naming the process when it can be seen (often a
    HAProxy or Ray worker left by a run that was killed)."""
    holder = holder_of(port)
    if holder is None:
        return f"{host}:{port} ({what}) is in use by another process (pick another with --port)"
    return (
        f"{host}:{port} ({what}) is held by {holder}, perhaps left by an earlier run: stop it "
        f"(kill {holder.rsplit('pid ', 1)[-1].rstrip(')')}) or pick another port"
    )


# HAProxy's own listeners (Serve's HAProxy ingress): a stale HAProxy on them fails the next start.
HAPROXY_PORTS = {
    "RAY_SERVE_HAPROXY_METRICS_PORT": 9101,
    "RAY_SERVE_HAPROXY_STATS_PORT": 8404,
}


def check_ports_free(host: str, port: int) -> None:
    """Refuse to start, saying who holds it, when the HTTP port or HAProxy's ports are taken."""
    if not _free_to_bind(host, port):
        raise SystemExit(port_in_use_message(host, port, "HTTP"))
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", RAY_ENV["RAY_SERVE_ENABLE_HA_PROXY"]) != "1":
        return
    for variable, default in HAPROXY_PORTS.items():
        haproxy_port = int(os.environ.get(variable, default))
        if not _free_to_bind("0.0.0.0", haproxy_port):
            raise SystemExit(port_in_use_message("0.0.0.0", haproxy_port, f"HAProxy, {variable}"))


def _get(url: str, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _post(url: str, body: dict[str, Any], timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_ready(base_url: str, timeout: float) -> dict[str, Any]:
    """Poll /readyz until it answers 200; raise TimeoutError with the last state otherwise."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status, last = _get(f"{base_url}/readyz")
            if status == 200:
                return last
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"not ready after {timeout:.0f}s: {last}")


# --- running the graph ---------------------------------------------------------------------------


# Ray environment for a latency-bound graph (measured in bench/serving_load.py; the chart sets the same
# in every Ray pod: helm/recserve values `rayService.rayEnv`). Ray starts workers at nice 15 so that a
# busy driver stays responsive: here the replicas are the service, and at nice 15 any other process on
# the host starves them. Ray Serve's documented high-throughput mode: HAProxy (C) instead of the Python
# proxy actor, the Ingress replicas answering HTTP themselves (direct ingress), gRPC between
# deployments, user code on the replica's loop and the GC frozen after start. On this 2-core machine
# it cuts CPU per request by about a quarter and the p99 at 50 requests/s by about half. A handle's
# gRPC channel takes replies of at most 4 MB by default; the Ingress fetches each version's item ids
# from the group holding the re-ranker once (1M items: 28 MB, refused at the xl run's first load), so
# replies may be up to 512 MB (a 10M-item catalog's ids are ~300 MB). HAProxy also replays a request
# on another Ingress replica when the one it went to closed the connection without an answer (a
# replica killed mid-request; Serve's default retries only a refused connection): a recommendation is
# a read, and an event batch is deduplicated by its events' `event_id` (serve_app/events.py), so a
# replay is answered once. In `bench/chaos.py --placement fused` a `kill -9` of an Ingress replica cost
# one event batch (ServerDisconnectedError) without it, none with it.
RAY_ENV = {
    "RAY_worker_niceness": "0",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "536870912",
}


def apply_ray_env() -> None:
    """Put RAY_ENV in this process's environment (values already set win). Call it before `ray` is
    imported: Serve reads these when it is imported, and handles created here (the app builder's)
    carry the transport they were created with into the replicas."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(num_cpus: int | None, metrics_export_port: int | None = None) -> None:
    """A local Ray whose workers import serve_app and feature_repo from this checkout; every process's
    metrics are exported for Prometheus on `metrics_export_port` (None: a port Ray picks)."""
    apply_ray_env()
    import ray

    project = str(Path(__file__).resolve().parents[1])
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": project}},
        _metrics_export_port=metrics_export_port,
    )
    if threading.current_thread() is threading.main_thread():
        # ray.init replaces the SIGTERM handler with sys.exit(15): keep ours (an orderly stop, exit 0).
        signal.signal(signal.SIGTERM, _interrupt)


def deploy(
    settings: dict[str, Any], config: dict[str, Any], name: str = APP_NAME, route_prefix: str = "/"
) -> None:
    """Run the graph as application `name` on the current Serve instance (not blocking)."""
    from ray import serve

    from serve_app.app import AppArgs, build_app

    app = build_app(AppArgs(settings=settings, deployments=deployment_options(config)))
    serve.run(
        app,
        name=name,
        route_prefix=route_prefix,
        blocking=False,
        logging_config=config.get("logging_config"),
    )


@contextmanager
def running_graph(args: argparse.Namespace, settings: dict[str, Any]) -> Iterator[str]:
    """Start Ray (local), Serve and the app; yield the base URL; shut everything down on exit."""
    import ray
    from ray import serve

    placement = ServeSettings(**settings).placement  # flag, --settings file, RECSERVE_PLACEMENT
    config = serve_config(dict(os.environ), placement=placement)
    http = config.get("http_options", {})
    host = args.host or http.get("host", "127.0.0.1")
    port = args.port or int(http.get("port", 8000))
    check_ports_free(host, port)
    metrics_port = args.metrics_port
    if metrics_port is not None and not _free_to_bind("0.0.0.0", metrics_port):
        logger.warning("metrics port %d is in use: Ray picks another", metrics_port)
        metrics_port = None
    init_ray(args.num_cpus, metrics_port)
    try:
        serve.start(
            http_options={**http, "host": host, "port": port},
            logging_config=config.get("logging_config"),
        )
        deploy(settings, config)
        yield f"http://{host}:{port}"
    finally:
        if threading.current_thread() is threading.main_thread():
            # A second Ctrl-C (a terminal's reaches the demo's parent too) must not cut this short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        logger.info("shutting down Serve and Ray")
        stop_ray(ray.shutdown)


# Serve's own shutdown waits for every replica's graceful shutdown and the controller (tens of
# seconds here). A local stop skips it: stopping Ray stops the replicas with it (in-flight requests
# end with the process, as they would on a crash), and the stop takes a few seconds.
REAP_GRACE_SECONDS = 3.0


def stop_ray(shutdown_ray: Any) -> None:
    """Stop Ray, then every process it started that is still alive.

    Ray's daemons (dashboard agent, runtime-env agent) and Serve's HAProxy can outlive
    `ray.shutdown()`; a HAProxy left on port 8000 answers 500 to everything and fails the next
    start. They are all descendants of this process until it stops, so they are listed first.
    (Serve's shutdown in a thread while Ray stops aborts the process: Ray's core worker is shared.)
    """
    import psutil

    family = psutil.Process().children(recursive=True)
    try:
        shutdown_ray()
    finally:
        reap(family, REAP_GRACE_SECONDS)


def reap(processes: list[Any], grace: float) -> None:
    """SIGTERM the processes still alive, SIGKILL those alive `grace` seconds later."""
    import psutil

    alive = [p for p in processes if p.is_running()]
    for process in alive:
        with suppress(psutil.NoSuchProcess):
            process.terminate()
    _, left = psutil.wait_procs(alive, timeout=grace)
    for process in left:
        with suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(left, timeout=grace)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM (`main` turns both into KeyboardInterrupt)."""
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        logger.info("stopping")


def curl_examples(base_url: str, user_id: str, item_id: str, auth: bool = False) -> str:
    """curl commands for the main routes; with auth on they send $RECSERVE_API_KEY."""
    rec = json.dumps({"user_id": user_id, "k": 10})
    event = json.dumps(
        {"events": [{"user_id": user_id, "item_id": item_id, "event_type": "click"}]}
    )
    key = ' -H "Authorization: Bearer $RECSERVE_API_KEY"' if auth else ""
    return (
        f"curl -s -X POST {base_url}/v1/recommendations -H 'Content-Type: application/json'{key} "
        f"-d '{rec}'\n"
        f"curl -s -X POST {base_url}/v1/events -H 'Content-Type: application/json'{key} "
        f"-d '{event}'\n"
        f"curl -s{key} {base_url}/v1/experiments   # variants, versions, live counts and CTR"
    )


def auth_banner(api: ApiConfig, local_demo: bool) -> str:
    """One line saying whether the API asks for keys, and where they come from."""
    if not api.auth.enabled:
        where = "local demo" if local_demo else "api.auth.enabled is false"
        return (
            f"auth: off ({where}): every route answers without an API key; anyone who reaches "
            "this port can call them (RECSERVE_API__AUTH__ENABLED=true and "
            "RECSERVE_API__AUTH__KEYS_FILE turn keys on: docs/security.md)"
        )
    sources = []
    if api.auth.keys_file is not None:
        sources.append(f"hashed keys from {api.auth.keys_file} (re-read when it changes)")
    if api.admin_api_key is not None:
        sources.append("api.admin_api_key (scope admin)")
    limit = api.rate_limit
    rate = (
        f"; rate limit {limit.requests_per_second:g}/s per key and Ingress replica"
        if limit.requests_per_second > 0
        else ""
    )
    return (
        f"auth: on: API keys from {' and '.join(sources)}; scopes "
        f"{', '.join(s.value for s in Scope)}{rate}. Send 'Authorization: Bearer <key>' "
        "(the curls below read $RECSERVE_API_KEY)"
    )


def demo_urls(base_url: str) -> str:
    """Where the demo page and the ops view are (served by the Ingress itself)."""
    return f"demo page: {base_url}/demo   (ops view: {base_url}/demo/ops)"


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_overrides(args)
    with running_graph(args, settings) as base_url:
        state = wait_ready(base_url, args.ready_timeout)
        print(
            f"serving {state.get('model_uri')} version {state.get('model_version')} at {base_url}"
        )
        print(f"docs: {base_url}/docs")
        api = ServeSettings(**settings).api
        print(auth_banner(api, local_demo=False))
        print(demo_urls(base_url))
        print(curl_examples(base_url, "u0", "i0", api.auth.enabled))
        sys.stdout.flush()
        wait_for_signal()
    return 0


# --- demo ----------------------------------------------------------------------------------------


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@contextmanager
def local_redis(url: str, directory: Path) -> Iterator[str]:
    """`url` if a Redis answers there, else a private redis-server on a free port (stopped after)."""
    if _redis_answers(url):
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(f"no Redis at {url} and no redis-server to start (install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    private = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers(private):
            if time.monotonic() > deadline:
                raise SystemExit("the private redis-server did not start")
            time.sleep(0.1)
        logger.info("started a private redis-server at %s", private)
        yield private
    finally:
        process.terminate()
        process.wait(timeout=10)


def prepare_features(data_dir: Path) -> None:
    """Feast apply + incremental materialization of the tables training wrote (embedded profile)."""
    from feature_repo.config import FeatureStoreConfig
    from feature_repo.store import apply, materialize_incremental

    config = FeatureStoreConfig(data_dir=data_dir)
    if not (data_dir / "features" / "user_profile.parquet").exists():
        raise SystemExit(f"no feature tables in {data_dir}/features: run `recserve train` first")
    apply(config)
    materialize_incremental(config, end=datetime.now(UTC))


def demo_ids(data_dir: Path) -> tuple[str, str]:
    """A known user and an item from the feature tables (for the printed examples)."""
    import pyarrow.parquet as pq

    users = pq.read_table(data_dir / "features" / "user_profile.parquet", columns=["user_id"])
    items = pq.read_table(data_dir / "features" / "item_profile.parquet", columns=["item_id"])
    return str(users.column(0)[0]), str(items.column(0)[0])


def cmd_demo(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir or Path("data")
    prepare_features(data_dir)
    user_id, item_id = demo_ids(data_dir)
    with local_redis(args.redis_url or DEFAULT_REDIS_URL, data_dir / "redis") as redis_url:
        args.redis_url = redis_url
        args.data_dir = data_dir
        settings = settings_overrides(args)
        # The features were just materialized into the embedded store: without this, a Redis URL
        # would point Feast's online store at that Redis instead.
        settings["feature_store"]["profile"] = "embedded"
        api = ServeSettings(**settings).api
        print(auth_banner(api, local_demo=True))
        sys.stdout.flush()
        with running_graph(args, settings) as base_url:
            state = wait_ready(base_url, args.ready_timeout)
            if api.auth.enabled:
                # Only hashes are configured: the demo has no key to show a request with.
                print("auth is on: the sample request and event are left to you (curls below)")
            else:
                status, body = _post(f"{base_url}/v1/recommendations", {"user_id": user_id, "k": 5})
                print(f"POST /v1/recommendations -> {status}")
                print(json.dumps(body, indent=2))
                status, body = _post(
                    f"{base_url}/v1/events",
                    {"events": [{"user_id": user_id, "item_id": item_id, "event_type": "click"}]},
                )
                print(f"POST /v1/events -> {status} {json.dumps(body)}")
            print(
                f"\nrecserve is serving {state.get('model_uri')} version "
                f"{state.get('model_version')} at {base_url} (docs: {base_url}/docs). Try:\n"
            )
            print(auth_banner(api, local_demo=True))
            print(curl_examples(base_url, user_id, item_id, api.auth.enabled))
            print(f"\n{demo_urls(base_url)}")
            print("\nCtrl-C stops it.")
            sys.stdout.flush()
            wait_for_signal()
    return 0


def placement_summary(placement: str | list[list[str]]) -> str:
    """Comment lines naming the deployments a placement yields and the stages each hosts."""
    lines = [f"# placement: {json.dumps(placement)}"]
    for entry in describe_placement(placement):
        where = entry["deployment"]
        hosted = " + ".join(entry["stages"])
        note = " (in the Ingress replica: no hop)" if where == "Ingress" else ""
        lines.append(f"#   {where}: {hosted}{note}")
    return "\n".join(lines) + "\n"


def cmd_config(args: argparse.Namespace) -> int:
    environ = dict(os.environ)
    placement = args.placement
    if placement is None:
        placement = ServeSettings().placement  # RECSERVE_PLACEMENT, else split
    config = serve_config(environ, placement=placement)
    print(placement_summary(placement), end="")
    print(yaml.safe_dump(config, sort_keys=False), end="")
    return 0


def cmd_shadow_report(args: argparse.Namespace) -> int:
    """Read the shadow log (Redis stream) and print how the shadow version compares."""
    from serve_app.experiments import ExperimentLog, ShadowSummary
    from serve_app.redis_client import connect_redis

    overrides: dict[str, Any] = {}
    if args.redis_url:
        overrides["redis_url"] = args.redis_url
    settings = ServeSettings(**overrides)
    experiment = settings.experiment
    log = ExperimentLog(
        connect_redis(settings.event_redis_url, 2.0),
        experiment.key_prefix,
        args.experiment or experiment.name,
        experiment.attribution_window_seconds,
    )
    entries = log.shadow_log(args.last)
    summary = ShadowSummary.of(entries)
    by_pair: dict[tuple[str, str, str], list[Any]] = {}
    for entry in entries:
        by_pair.setdefault((entry.variant, entry.served_version, entry.shadow_version), []).append(
            entry
        )
    rows = [
        {
            "variant": variant,
            "served_version": served,
            "shadow_version": shadow or "-",
            **ShadowSummary.of(group).__dict__,
        }
        for (variant, served, shadow), group in sorted(by_pair.items())
    ]
    report = {"stream": log.shadow_stream, "total": summary.__dict__, "by_version": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=dict) + "\n", encoding="utf-8")
    print(f"shadow log {log.shadow_stream}: {summary.mirrored} comparisons")
    header = f"{'variant':<12} {'served':>6} {'shadow':>6} {'n':>6} {'errors':<24} "
    header += f"{'jaccard':>7} {'rbo':>6} {'p50 served ms':>13} {'p50 shadow ms':>13}"
    print(header)

    def fmt(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for row in rows:
        errors = ",".join(f"{k}={v}" for k, v in sorted(row["errors"].items())) or "0"
        print(
            f"{row['variant']:<12} {row['served_version']:>6} {row['shadow_version']:>6} "
            f"{row['mirrored']:>6} {errors:<24} {fmt(row['mean_jaccard']):>7} "
            f"{fmt(row['mean_rbo']):>6} {fmt(row['median_served_ms'], 1):>13} "
            f"{fmt(row['median_shadow_ms'], 1):>13}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recserve-serve", description="recserve online graph on Ray Serve."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--settings",
            type=Path,
            help="YAML file of ServeSettings fields (experiment, ranking, api, ...); flags win",
        )
        p.add_argument("--data-dir", type=Path, help="data dir of training (default: data)")
        p.add_argument(
            "--model-uri", help="models:/<name>@<alias> (default models:/recserve@champion)"
        )
        p.add_argument("--tracking-uri", help="MLflow URI (default: sqlite under the data dir)")
        p.add_argument("--redis-url", help="Redis for events and real-time features")
        p.add_argument("--poll-interval", type=float, help="seconds between alias checks")
        p.add_argument("--host", help="HTTP host (default: serve_config.yaml, 127.0.0.1)")
        p.add_argument("--port", type=int, help="HTTP port (default: serve_config.yaml, 8000)")
        p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray")
        p.add_argument(
            "--metrics-port",
            type=int,
            default=8080,
            help="Ray's Prometheus metrics port (monitoring/prometheus/prometheus.yml scrapes 8080)",
        )
        p.add_argument(
            "--ready-timeout", type=float, default=180.0, help="seconds to wait for /readyz"
        )
        placement_flag(p)

    def placement_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--placement",
            type=placement_arg,
            default=None,
            help="how the stages are grouped into deployments: split, two-tier, fused, or a JSON "
            'list of groups such as \'[["user_tower","retriever","ranker"],["reranker"]]\' '
            "(default: RECSERVE_PLACEMENT, else split)",
        )

    s = sub.add_parser("serve", help="serve the registry's champion until Ctrl-C / SIGTERM")
    common(s)
    s.set_defaults(func=cmd_serve)
    d = sub.add_parser(
        "demo", help="materialize features, serve, show a request and an event, print curls"
    )
    common(d)
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser(
        "config",
        help="print the deployments a placement yields and the effective Serve config "
        "(file + env overrides)",
    )
    placement_flag(c)
    c.set_defaults(func=cmd_config)
    r = sub.add_parser(
        "shadow-report",
        help="compare served and shadow lists from the shadow log (top-k Jaccard, RBO, latency)",
    )
    r.add_argument("--redis-url", help="Redis holding the log (default: REDIS_URL / settings)")
    r.add_argument("--experiment", help="experiment name (default: settings, 'default')")
    r.add_argument("--last", type=int, default=100_000, help="read the latest N comparisons")
    r.add_argument("--json", type=Path, help="also write the report as JSON")
    r.set_defaults(func=cmd_shadow_report)
    k = sub.add_parser(
        "keys", help="API keys (docs/security.md): hash a key into a keys-file entry, check a file"
    )
    add_key_commands(k.add_subparsers(dest="keys_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_ray_env()
    args = build_parser().parse_args(argv)
    # SIGTERM (Kubernetes, systemd, kill) unwinds like Ctrl-C: every `finally` stops what it started.
    signal.signal(signal.SIGTERM, _interrupt)
    # And SIGINT always does, even when started ignoring it (a shell's background job `... &`
    # inherits SIGINT ignored, and Python then leaves it so: `kill -INT` would do nothing).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
