"""A redis-server started with the arguments the chart renders for its StatefulSet (only port, dir and bind
are made local, and the kubelet's $(VAR) expansion is done here). Shared by test_redis and test_redis_acl."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's expansion of $(VAR) in args and command from the container's env."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


class RenderedRedis:
    """redis-server with the StatefulSet's arguments; `env` holds the Secret's values by env name."""

    def __init__(
        self, args: list[str], directory: Path, env: dict[str, str], bind: str = "127.0.0.1"
    ) -> None:
        self.port = free_port()
        self.env = env
        local = list(args)
        local[local.index("--port") + 1] = str(self.port)
        local[local.index("--dir") + 1] = str(directory)
        local = [expand(a, env) for a in local]
        self.command = ["redis-server", *local, "--bind", bind]
        self.log = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, username: str | None = None, password: str | None = None) -> redis.Redis:
        """Start and wait for the port; a client as `username` (None: the default user)."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        # Wait for the port with a plain socket: redis-py retries failed connects with backoff.
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        return redis.Redis(port=self.port, username=username, password=password)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
