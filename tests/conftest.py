"""Session fixtures for real services: the shared Redis (started if not answering) and a private
redis-server per fault test (on a free port in tmp, stopped and started by the test)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from serve_app.cli import apply_ray_env

# Before anything imports Ray Serve: the graph's handles are created in this process (see RAY_ENV).
apply_ray_env()

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"
# The machine's own command (../shared/SERVICES.md). It is left running afterwards: other sessions
# share this server, and stopping it under them would break their runs.
START_SHARED_REDIS = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _wait_until_answers(client: redis.Redis, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not _answers(client):
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not answer in time")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis on 127.0.0.1:6379, started with the machine's command if not answering."""
    client = redis.Redis.from_url(SHARED_REDIS_URL, socket_connect_timeout=1)
    if not _answers(client):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
        Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
        Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
        subprocess.run(START_SHARED_REDIS, check=True)
        _wait_until_answers(client)
    return SHARED_REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test alone on the shared Redis; its keys are deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    yield prefix
    for key in redis_client.scan_iter(match=f"{prefix}*", count=1000):
        redis_client.delete(key)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of one test: no persistence, its own port and directory; stop/start at will."""

    persistence: tuple[str, ...] = ("--appendonly", "no")  # a subclass may keep its data

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *self.persistence,
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_until_answers(redis.Redis(port=self.port, socket_connect_timeout=0.2))

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def freeze(self) -> None:
        """SIGSTOP: a hung Redis (clients time out) that keeps its data, unlike stop()."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


# --- serving: a trained bundle, a private Redis and one Ray Serve app per session ------------------

SERVING_ADMIN_KEY = "test-admin-key"
SERVING_POLL_SECONDS = 1.0
SERVING_SHADOW_SHARE = 0.25


@dataclass(frozen=True)
class TrainedBundle:
    """A real bundle trained on the tiny synthetic data set, registered and promoted champion, with
    its feature tables applied and materialized in the embedded (SQLite) Feast store."""

    data_dir: Path
    tracking_uri: str
    version: str
    bundle_dir: Path
    dataset_dir: Path


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> TrainedBundle:
    from datetime import UTC, datetime

    from feature_repo.store import apply, materialize_incremental
    from training.config import SIZES, SyntheticConfig, TrainingSettings
    from training.data import write_dataset
    from training.pipeline import run_pipeline
    from training.registry import promote
    from training.synthetic import generate

    data_dir = tmp_path_factory.mktemp("serving")
    settings = TrainingSettings(
        data_dir=data_dir,
        synthetic=SyntheticConfig(**SIZES["tiny"]),
        redis_url=None,
        # No settings search (the suite stays fast); collaborative models on (the default), so
        # every stage is exercised.
        search={"budget_seconds": 0},
    )
    dataset = generate(settings.synthetic, progress=False)
    dataset_dir = data_dir / "datasets" / dataset.name
    write_dataset(dataset, dataset_dir)
    result = run_pipeline(settings, dataset, progress=False)
    assert result.registered is not None
    promote(tracking_uri=settings.tracking_uri, model_name="recserve", force=True)
    apply(settings.feature_store)
    materialize_incremental(settings.feature_store, end=datetime.now(UTC))
    return TrainedBundle(
        data_dir=data_dir,
        tracking_uri=settings.tracking_uri,
        version=result.registered.version,
        bundle_dir=result.bundle_dir,
        dataset_dir=dataset_dir,
    )


@pytest.fixture(scope="session")
def serve_url() -> Iterator[str]:
    """One local Ray (2 CPUs) with Serve's HTTP proxy on a free loopback port, for the session."""
    import ray
    from ray import serve

    from serve_app.cli import init_ray

    init_ray(num_cpus=2)
    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        logging_config={"enable_access_log": False},
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def serving_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """The graph's own Redis (events, real-time state): a test may stop and restart it."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    server = PrivateRedis(tmp_path_factory.mktemp("serving-redis"))
    server.start()
    yield server
    server.stop()


@dataclass(frozen=True)
class ServingApp:
    url: str
    bundle: TrainedBundle
    redis: PrivateRedis
    admin_key: str
    poll_seconds: float


@pytest.fixture(scope="session")
def serving_app(
    serve_url: str, trained_bundle: TrainedBundle, serving_redis: PrivateRedis
) -> Iterator[ServingApp]:
    """The whole graph (`build_app`, serve_config.yaml options) over the trained bundle: deployed
    once per session (Serve takes tens of seconds to start), deleted at the end."""
    from ray import serve

    from serve_app.cli import deploy, wait_ready
    from serve_app.config import serve_config

    settings = {
        "feature_store": {"data_dir": str(trained_bundle.data_dir), "profile": "embedded"},
        "redis_url": serving_redis.url,
        "models": {
            "tracking_uri": trained_bundle.tracking_uri,
            "poll_interval_seconds": SERVING_POLL_SECONDS,
        },
        "api": {"admin_api_key": SERVING_ADMIN_KEY},
        # A quarter of the requests mirrored to the served version itself: the shadow path and its
        # metrics run in every serving test (and must never change a response).
        # Generous limits: the live scrape test counts every mirror (none skipped or cut short).
        "experiment": {
            "shadow": {
                "model": "champion",
                "share": SERVING_SHADOW_SHARE,
                "timeout_seconds": 10.0,
                "max_in_flight": 64,
            }
        },
    }
    deploy(settings, serve_config({}), name="recserve")
    try:
        wait_ready(serve_url, 300)
        yield ServingApp(
            serve_url, trained_bundle, serving_redis, SERVING_ADMIN_KEY, SERVING_POLL_SECONDS
        )
    finally:
        serve.delete("recserve")
