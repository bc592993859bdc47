"""`recserve-serve serve` stops cleanly: SIGTERM or SIGINT ends it within 10 s and leaves no Ray or
HAProxy process behind (counted), and a start on a port a stale process holds names that process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from serve_app.cli import port_in_use_message
from tests.conftest import PrivateRedis, TrainedBundle, free_port

pytestmark = pytest.mark.integration

STOP_SECONDS = 10.0
START_SECONDS = 240.0


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"recserve-serve exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"recserve-serve not ready within {timeout:.0f}s")


def ignore_sigint() -> None:
    """In the child before exec: SIGINT ignored, as a shell's background job (`... &`) starts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(
    ("signum", "started_ignoring_sigint"),
    [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
    ids=["SIGTERM", "SIGINT", "SIGINT-background-job"],
)
def test_a_signal_stops_the_server_within_10s_leaving_no_process(
    signum: signal.Signals,
    started_ignoring_sigint: bool,
    trained_bundle: TrainedBundle,
    private_redis: PrivateRedis,
    tmp_path: Path,
) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    log = log_path.open("wb")
    # Its own HAProxy listeners: the session's graph holds the default ones.
    env = {
        **os.environ,
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serve_app.cli",
            "serve",
            "--data-dir",
            str(trained_bundle.data_dir),
            "--tracking-uri",
            trained_bundle.tracking_uri,
            "--redis-url",
            private_redis.url,
            "--port",
            str(port),
            "--num-cpus",
            "2",
        ],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=ignore_sigint if started_ignoring_sigint else None,
    )
    family: list[psutil.Process] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, START_SECONDS)
        family = psutil.Process(process.pid).children(recursive=True)
        names = {p.name() for p in family if p.is_running()}
        assert any("haproxy" in n for n in names), names  # the processes that used to stay
        assert any("raylet" in n for n in names), names
        start = time.monotonic()
        process.send_signal(signum)
        try:
            code = process.wait(timeout=STOP_SECONDS + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"no stop within {STOP_SECONDS + 5:.0f}s; the server said:\n{tail(log_path)}"
            )
        stopped = time.monotonic() - start
        assert stopped <= STOP_SECONDS, f"stopped in {stopped:.1f}s:\n{tail(log_path)}"
        assert code in (0, 130), code  # an orderly exit: not killed, not aborted
        _, alive = psutil.wait_procs(family, timeout=max(0.1, STOP_SECONDS - stopped))
        assert not alive, [f"{p.name()} ({p.pid})" for p in alive]
        with socket.socket() as sock:  # nobody listens on the port any more (TIME_WAIT aside)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for leftover in family:  # a failed stop must not leave HAProxy or Ray to the next tests
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
        log.close()


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def test_a_held_port_names_its_holder() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        message = port_in_use_message("127.0.0.1", port, "HTTP")
    assert f"127.0.0.1:{port}" in message
    assert f"pid {os.getpid()}" in message, message
