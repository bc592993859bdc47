"""Registry work of a stage replica in a short-lived child process, so the replica never imports MLflow.

`RegistryProcess` (the replica's side) runs `python -m serve_app.registry_process fetch ...` and
turns its one JSON answer into a path, or its JSON error into the ModelUnavailable or
BundleIntegrityError that `serve_app.bundle` raised in the child; `main` (the child) is that work. A
stage never resolves an alias (the router names the version), so fetching is all the child does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_app.errors import BundleIntegrityError, ModelUnavailable, RecserveError

MODULE = "serve_app.registry_process"
# The checkout this module was imported from: the child runs the same code as its parent.
PROJECT_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass(frozen=True)
class RegistryProcess:
    """Runs registry work in a child of this interpreter (environment inherited, MLFLOW_* included;
    the tracking URI passed explicitly); a child that fails, hangs past `timeout_seconds` or cannot
    start is ModelUnavailable."""

    timeout_seconds: float = 300.0
    python: str = field(default_factory=lambda: sys.executable)

    def fetch(
        self,
        tracking_uri: str,
        model_name: str,
        version: str,
        cache_dir: Path,
        *,
        allow_untagged: bool = False,
    ) -> Path:
        """`serve_app.bundle.fetch_bundle`, in the child: the verified cache directory."""
        flags = ["--allow-untagged"] if allow_untagged else []
        answer = self.call("fetch", tracking_uri, model_name, version, str(cache_dir), *flags)
        return Path(answer["path"])

    def call(self, command: str, tracking_uri: str, model_name: str, *args: str) -> dict[str, Any]:
        """One child run of `command`: its JSON answer, or its error raised here."""
        argv = [self.python, "-m", MODULE, command, tracking_uri, model_name, *args]
        pythonpath = os.environ.get("PYTHONPATH")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [PROJECT_ROOT, pythonpath] if pythonpath else [PROJECT_ROOT]
            ),
        }
        try:
            done = subprocess.run(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.timeout_seconds,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ModelUnavailable(
                f"registry {command} of '{model_name}' took longer than "
                f"{self.timeout_seconds:g} s (child process killed)"
            ) from None
        except OSError as exc:
            raise ModelUnavailable(f"registry child process could not start: {exc}") from None
        answer = _last_json(done.stdout)
        if done.returncode == 0 and answer is not None and "error" not in answer:
            return answer
        if answer is not None and "error" in answer:
            raise error_from_record(answer["error"])
        last = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ModelUnavailable(
            f"registry {command} of '{model_name}' failed (exit {done.returncode}): {last[0]}"
        )


def _last_json(stdout: str) -> dict[str, Any] | None:
    lines = stdout.strip().splitlines()
    if not lines:
        return None
    try:
        answer = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return answer if isinstance(answer, dict) else None


def error_record(exc: RecserveError) -> dict[str, str | None]:
    """What crosses the process boundary of an error: its class, message and file."""
    file = getattr(exc, "file", None)
    message = exc.message.removeprefix(f"{file}: ") if file else exc.message
    return {"kind": type(exc).__name__, "message": message, "file": file}


def error_from_record(record: dict[str, Any]) -> RecserveError:
    """The exception `error_record` described (anything but an integrity error: ModelUnavailable)."""
    message = str(record.get("message", "registry child failed"))
    if record.get("kind") == BundleIntegrityError.__name__:
        return BundleIntegrityError(message, file=record.get("file"))
    return ModelUnavailable(message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download and verify a version into the cache")
    fetch.add_argument("tracking_uri")
    fetch.add_argument("model_name")
    fetch.add_argument("version")
    fetch.add_argument("cache_dir", type=Path)
    fetch.add_argument(
        "--allow-untagged",
        action="store_true",
        help="accept a version with no pinned manifest digest (models.allow_untagged)",
    )
    args = parser.parse_args(argv)
    from serve_app.bundle import fetch_bundle

    answer: dict[str, Any]
    try:
        # Only the answer goes to stdout: anything a library prints goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            path = fetch_bundle(
                args.tracking_uri,
                args.model_name,
                args.version,
                args.cache_dir,
                allow_untagged=args.allow_untagged,
            )
            answer = {"path": str(path)}
        code = 0
    except RecserveError as exc:
        answer, code = {"error": error_record(exc)}, 1
    print(json.dumps(answer), flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
