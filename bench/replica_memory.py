"""Resident memory of each Serve replica of the graph, for this checkout and, side by side in the same
run, for another commit of it (the graph as it was: `--before 73957a2`, before each stage loaded only
its own artifacts).

Each side: `recserve-serve serve` as a child process on the same trained data dir and the same Redis,
`--requests` recommendations to warm every path, then VmRSS of every replica process under it.

    python bench/replica_memory.py --data-dir /tmp/demo --before 73957a2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_load import (  # noqa: E402
    free_port,
    private_redis,
    ready,
    replica_processes,
    sample_users,
    write_results,
)

STAGES = ("UserTower", "Retriever", "Ranker", "ReRanker")
ROLES = ("Ingress", *STAGES, "EventWriter")


def recommend(url: str, user: str) -> None:
    request = urllib.request.Request(
        f"{url}/v1/recommendations",
        data=json.dumps({"user_id": user, "k": 10}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def replica_rss_mb(root: int) -> dict[str, float]:
    """VmRSS (MiB) of the Serve replicas under `root`, by deployment."""
    import psutil

    out: dict[str, float] = {}
    for role in ROLES:
        for process in replica_processes(role, root):
            try:
                rss = process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            out[role] = round(out.get(role, 0.0) + rss / 2**20, 1)
    return out


def measure(
    checkout: Path, data_dir: Path, redis_url: str, users: list[str], requests: int
) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "serve_app.cli", "serve", "--data-dir", str(data_dir)]
    command += ["--redis-url", redis_url, "--port", str(port), "--num-cpus", "2"]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 300
            while not ready(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"{checkout}: the graph did not start\n{log.read()[-3000:]}")
                time.sleep(1.0)
            for i in range(requests):
                recommend(url, users[i % len(users)])
            return replica_rss_mb(process.pid)
        finally:
            import psutil

            family = psutil.Process(process.pid).children(recursive=True)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
            # An older checkout may leave Ray's agents and HAProxy behind (on ports the next needs).
            for child in family:
                if child.is_running():
                    child.kill()
            psutil.wait_procs(family, timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="trained data dir (registry)")
    parser.add_argument("--before", help="a commit to measure beside this checkout")
    parser.add_argument("--requests", type=int, default=200, help="warm-up requests per side")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/replica_memory.json")
    args = parser.parse_args(argv)
    data_dir = args.data_dir.resolve()
    users = sample_users(data_dir, 200, 0.1, seed=3)
    sides: dict[str, dict[str, float]] = {}
    with private_redis() as redis_url, tempfile.TemporaryDirectory() as tmp:
        if args.before:
            before = Path(tmp) / "before"
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(before), args.before],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            try:
                sides[f"before ({args.before})"] = measure(
                    before, data_dir, redis_url, users, args.requests
                )
            finally:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=True
                )
        sides["this checkout"] = measure(ROOT, data_dir, redis_url, users, args.requests)
    print(f"\n{'side':<24}" + "".join(f"{r:>12}" for r in ROLES) + f"{'stages':>12}")
    results: dict[str, Any] = {}
    for name, rss in sides.items():
        stages = round(sum(rss.get(s, 0.0) for s in STAGES), 1)
        results[name] = {**rss, "stages": stages}
        print(f"{name:<24}" + "".join(f"{rss.get(r, 0.0):>12.1f}" for r in ROLES) + f"{stages:>12}")
    if len(sides) == 2:
        old, new = (results[n]["stages"] for n in sides)
        results["ratio"] = round(new / old, 3)
        print(f"\nstage replicas together: {new:.0f} MiB against {old:.0f} MiB, {new / old:.2f}x")
    write_results(args.json, "replica_memory.py", argv or sys.argv[1:], results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
