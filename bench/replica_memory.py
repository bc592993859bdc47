"""Memory of each serving stage replica and the bundle's size on disk, for this checkout and, side by
side in the same run, for another commit of it (`--before`).

Two ways to measure:
- stages (`--bundle DIR` or `--synthetic-items N`): one process per stage (UserTower, Retriever,
  Ranker, ReRanker; `--replicas` of each) at once, as replicas on one node are, each loading the
  same 1..V versions (distinct copies of the bundle, as distinct versions are distinct files)
  through the stage's `from_directory` and warming them; no Ray, no Redis. Memory after the warm-up, then again after
  every mapped array was read once (a replica that has served long enough to touch every row).
  `--synthetic-items` writes a servable bundle of that size without training
  (`tests.bundle_factory.make_serving_bundle`: random embeddings, an untrained tower, an exact
  index, a four-tree ranker), e.g. a million items:
      python bench/replica_memory.py --synthetic-items 1000000 --versions 1,4 --before e02c3f6 \\
          --work-dir /tmp/replica-memory
- graph (`--data-dir DIR`): `recserve-serve serve` on a trained data dir, `--requests` recommendations
  to warm every path, then the memory of every Serve replica process under it:
      python bench/replica_memory.py --data-dir /tmp/demo --before 73957a2

Per process: RSS; USS (pages no other process maps: its own heap, plus file pages only it maps);
PSS (RSS with each shared page split among the processes mapping it: summed over processes, what
they cost together); anonymous (heap and other private memory: what the page cache can never share
or reclaim). Memory-mapped bundle files count in RSS but not in anonymous memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
MEASURES = ("rss", "uss", "pss", "anon")
MIB = 2**20


def process_memory(process: Any) -> dict[str, float]:
    """RSS, USS, PSS and anonymous memory of one process, MiB."""
    info = process.memory_full_info()
    anon = 0
    with open(f"/proc/{process.pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Anonymous:"):
                anon = int(line.split()[1]) * 1024
    return {
        "rss": round(info.rss / MIB, 1),
        "uss": round(info.uss / MIB, 1),
        "pss": round(info.pss / MIB, 1),
        "anon": round(anon / MIB, 1),
    }


def bundle_size_mb(directory: Path) -> dict[str, float]:
    """Every file of a bundle directory and the total, MB (10^6 bytes, as downloads are counted)."""
    sizes = {p.name: round(p.stat().st_size / 1e6, 1) for p in sorted(directory.iterdir())}
    return {**sizes, "total": round(sum(sizes.values()), 1)}


@contextmanager
def checkout_of(commit: str | None) -> Iterator[Path]:
    """This checkout, or a temporary worktree of `commit` (removed afterwards)."""
    if commit is None:
        yield ROOT
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), commit],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            yield path
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=True
            )


# --- stages, in process -------------------------------------------------------------------------

# Runs in each stage's process, with the measured checkout first on sys.path: only the stage model
# classes and `read_manifest`, whose signatures both sides share.
STAGE_PROCESS = r"""
import dataclasses, json, sys, time
from pathlib import Path
import numpy as np
from serve_app.bundle import read_manifest

stage, directories = sys.argv[1], sys.argv[2:]
if stage == "UserTower":
    from serve_app.stages.user_tower import TowerModel as Model
elif stage == "Retriever":
    from serve_app.stages.retriever import RetrievalModel as Model
elif stage == "Ranker":
    from serve_app.stages.ranker import RankingModel as Model
else:
    from serve_app.stages.reranker import ReRankingModel as Model

start = time.perf_counter()
models = []
for version, directory in enumerate(directories, 1):
    path = Path(directory)
    model = Model.from_directory(path, str(version), read_manifest(path))
    model.warm()
    models.append(model)
print(json.dumps({"load_seconds": round(time.perf_counter() - start, 2)}), flush=True)


def arrays(value, depth=0):
    if isinstance(value, np.ndarray):
        yield value
    elif depth < 5 and dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from arrays(getattr(value, field.name), depth + 1)
    elif depth < 5 and isinstance(value, dict):
        for item in value.values():
            yield from arrays(item, depth + 1)


sys.stdin.readline()  # the parent measured after the warm-up: read every array once
total = 0
for model in models:
    for array in arrays(model):
        if array.size and array.flags.c_contiguous:
            total += int(array.reshape(-1).view(np.uint8)[::4096].sum())  # a byte of every page
print(json.dumps({"touched": total >= 0}), flush=True)
sys.stdin.readline()
"""


def measure_stages(checkout: Path, directories: Sequence[Path], replicas: int) -> dict[str, Any]:
    """Start `replicas` processes per stage on `directories` (its versions), all at once; their
    memory (replicas summed) after loading and warming, then after reading every array."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    processes = {
        (stage, replica): subprocess.Popen(
            [sys.executable, "-c", STAGE_PROCESS, stage, *map(str, directories)],
            cwd=checkout,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for stage in STAGES
        for replica in range(replicas)
    }
    out: dict[str, Any] = {stage: {"load_seconds": 0.0} for stage in STAGES}

    def add(stage: str, state: str, process: subprocess.Popen[str]) -> None:
        memory = process_memory(psutil.Process(process.pid))
        total = out[stage].setdefault(state, dict.fromkeys(MEASURES, 0.0))
        for key in MEASURES:
            total[key] = round(total[key] + memory[key], 1)

    try:
        for (stage, _), process in processes.items():
            line = process.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise SystemExit(f"{checkout}: the {stage} process failed (exit {process.wait()})")
            seconds = json.loads(line)["load_seconds"]
            out[stage]["load_seconds"] = max(out[stage]["load_seconds"], seconds)
        for (stage, _), process in processes.items():
            add(stage, "warm", process)
        for process in processes.values():
            process.stdin.write("\n")  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]
        for process in processes.values():
            process.stdout.readline()  # type: ignore[union-attr]
        for (stage, _), process in processes.items():
            add(stage, "touched", process)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
            process.wait()
    for state in ("warm", "touched"):
        out[f"stages_{state}"] = {
            m: round(sum(out[s][state][m] for s in STAGES), 1) for m in MEASURES
        }
    return out


def synthetic_versions(args: argparse.Namespace, count: int) -> tuple[list[Path], list[Path]]:
    """`count` copies (distinct files) of a synthetic bundle, and the same versions as format 1
    bundles with the TorchScript tower beside the npz, as the earlier checkout wrote them
    (hard links to the same data files; only the manifest and `user_tower.pt` are their own)."""
    from tests.bundle_factory import make_serving_bundle

    work = args.work_dir
    first = work / "after" / "1"
    if not (first / "manifest.json").exists():
        print(f"writing a {args.synthetic_items:,}-item bundle into {first} ...", flush=True)
        start = time.perf_counter()
        shutil.rmtree(first, ignore_errors=True)
        make_serving_bundle(
            first, n_items=args.synthetic_items, dim=args.dim, hidden=args.hidden, seed=0
        )
        print(f"  written in {time.perf_counter() - start:.0f} s", flush=True)
    after = [first]
    for version in range(2, count + 1):
        target = work / "after" / str(version)
        if not (target / "manifest.json").exists():
            shutil.copytree(first, target, dirs_exist_ok=True)
        after.append(target)
    before = [format_1_copy(directory, work / "before" / directory.name) for directory in after]
    return after, before


def format_1_copy(directory: Path, target: Path) -> Path:
    """The bundle as format 1 wrote it: the same files plus `user_tower.pt` (the tower as
    TorchScript), listed in a format 1 manifest."""
    import hashlib
    import warnings

    import torch

    from serve_app.bundle import read_manifest
    from training.registry import write_manifest
    from training.two_tower import read_user_tower

    if (target / "manifest.json").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for path in directory.iterdir():
        if path.name != "manifest.json" and not (target / path.name).exists():
            os.link(path, target / path.name)
    script = directory.parent.parent / "user_tower.pt"
    if not script.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(read_user_tower(directory)), str(script))
    os.link(script, target / "user_tower.pt")
    digest = hashlib.sha256(script.read_bytes()).hexdigest()
    manifest = read_manifest(directory)
    files = {**manifest.files, "user_tower.pt": digest}
    write_manifest(target, manifest.model_copy(update={"files": files, "format_version": 1}))
    return target


def stage_table(name: str, result: dict[str, Any]) -> None:
    for state in ("warm", "touched"):
        cells = [f"{result[s][state]['anon']:.0f}/{result[s][state]['pss']:.0f}" for s in STAGES]
        total = result[f"stages_{state}"]
        cells.append(f"{total['anon']:.0f}/{total['pss']:.0f}")
        print(f"{name + ' ' + state:<34}" + "".join(f"{c:>14}" for c in cells))


def run_stages(args: argparse.Namespace) -> dict[str, Any]:
    versions = sorted({int(v) for v in args.versions.split(",")})
    if args.bundle is not None:
        after = [args.bundle.resolve()] * max(versions)  # one directory: an upper bound on sharing
        before = after
    else:
        after, before = synthetic_versions(args, max(versions))
    results: dict[str, Any] = {
        "bundle": str(after[0]),
        "bundle_size_mb": {"this checkout": bundle_size_mb(after[0])},
    }
    if args.before and before is not after:
        results["bundle_size_mb"][f"before ({args.before})"] = bundle_size_mb(before[0])
    sides = [(f"before ({args.before})", args.before, before)] if args.before else []
    sides.append(("this checkout", None, after))
    print(f"\n{'MiB anonymous/PSS':<34}" + "".join(f"{s:>14}" for s in (*STAGES, "stages")))
    for name, commit, directories in sides:
        with checkout_of(commit) as checkout:
            for count in versions:
                result = measure_stages(checkout, directories[:count], args.replicas)
                key = f"{count} versions" + (
                    f", {args.replicas} replicas" if args.replicas > 1 else ""
                )
                results.setdefault(name, {})[key] = result
                stage_table(f"{name}, {count} v x {args.replicas} r", result)
    for label, sizes in results["bundle_size_mb"].items():
        print(f"bundle on disk, {label}: {sizes['total']:,.1f} MB")
    return results


# --- the graph, under Ray Serve -----------------------------------------------------------------


def recommend(url: str, user: str) -> None:
    request = urllib.request.Request(
        f"{url}/v1/recommendations",
        data=json.dumps({"user_id": user, "k": 10}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def replica_memory(root: int) -> dict[str, dict[str, float]]:
    """Memory (MiB) of the Serve replicas under `root`, by deployment (replicas summed)."""
    import psutil

    out: dict[str, dict[str, float]] = {}
    for role in ROLES:
        for process in replica_processes(role, root):
            try:
                memory = process_memory(process)
            except (psutil.NoSuchProcess, FileNotFoundError):
                continue
            total = out.setdefault(role, dict.fromkeys(MEASURES, 0.0))
            for key in MEASURES:
                total[key] = round(total[key] + memory[key], 1)
    return out


def measure_graph(
    checkout: Path, data_dir: Path, redis_url: str, users: list[str], requests: int
) -> dict[str, dict[str, float]]:
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
            return replica_memory(process.pid)
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


def run_graph(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = args.data_dir.resolve()
    users = sample_users(data_dir, 200, 0.1, seed=3)
    sides: dict[str, dict[str, dict[str, float]]] = {}
    with private_redis() as redis_url:
        if args.before:
            with checkout_of(args.before) as before:
                sides[f"before ({args.before})"] = measure_graph(
                    before, data_dir, redis_url, users, args.requests
                )
        sides["this checkout"] = measure_graph(ROOT, data_dir, redis_url, users, args.requests)
    print(f"\n{'MiB RSS/PSS':<24}" + "".join(f"{r:>14}" for r in ROLES) + f"{'stages':>14}")
    results: dict[str, Any] = {}
    for name, memory in sides.items():
        stages = {m: round(sum(memory.get(s, {}).get(m, 0.0) for s in STAGES), 1) for m in MEASURES}
        results[name] = {**memory, "stages": stages}
        cells = [
            f"{memory.get(r, {}).get('rss', 0):.0f}/{memory.get(r, {}).get('pss', 0):.0f}"
            for r in ROLES
        ]
        cells.append(f"{stages['rss']:.0f}/{stages['pss']:.0f}")
        print(f"{name:<24}" + "".join(f"{c:>14}" for c in cells))
    if len(sides) == 2:
        old, new = (results[n]["stages"]["rss"] for n in sides)
        results["ratio"] = round(new / old, 3)
        print(
            f"\nstage replicas together (RSS): {new:.0f} MiB against {old:.0f} MiB, {new / old:.2f}x"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--data-dir", type=Path, help="graph: a trained data dir (registry)")
    what.add_argument("--bundle", type=Path, help="stages: a bundle directory")
    what.add_argument("--synthetic-items", type=int, help="stages: write a bundle of this size")
    parser.add_argument("--before", help="a commit to measure beside this checkout")
    parser.add_argument("--requests", type=int, default=200, help="graph: warm-up requests")
    parser.add_argument("--versions", default="1,4", help="stages: version counts to load")
    parser.add_argument("--replicas", type=int, default=1, help="stages: processes per stage")
    parser.add_argument("--dim", type=int, default=64, help="synthetic: embedding dimension")
    parser.add_argument("--hidden", type=int, default=128, help="synthetic: tower width")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/replica-memory"))
    parser.add_argument(
        "--json",
        type=Path,
        help="default: bench/results/replica_memory.json (graph), replica_memory_stages.json",
    )
    args = parser.parse_args(argv)
    graph = args.data_dir is not None
    results = run_graph(args) if graph else run_stages(args)
    default = "replica_memory.json" if graph else "replica_memory_stages.json"
    write_results(
        args.json or ROOT / "bench/results" / default,
        "replica_memory.py",
        argv or sys.argv[1:],
        results,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
