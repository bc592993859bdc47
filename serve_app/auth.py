"""API keys and scopes: the rules the Ingress applies (`serve_app.access`).

Pure: no Ray, no web framework. Keys are stored as the sha256 of the key (a JSON file the chart keeps in
a Kubernetes Secret, re-read when it changes), each with a name and scopes; `route_rule` says what a
route needs (the per-key rate limit is `serve_app.rate_limit`). `python -m serve_app.auth hash` (or
`recserve-serve keys hash`) turns a key read from stdin into a file entry. docs/security.md explains.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class Scope(StrEnum):
    """What a key may do (docs/security.md has the table of routes)."""

    RECOMMEND = "recommend"  # POST /v1/recommendations
    EVENTS = "events"  # POST /v1/events
    ADMIN = "admin"  # /v1/admin/*, GET /v1/experiments
    DEBUG = "debug"  # explain traces, ?debug=1 timings, the demo and /v1/demo/*


# A route's requirement besides a scope: open to anyone, or any valid key (docs, unknown paths).
OPEN = "open"
ANY_KEY = "any key"
Requirement = Scope | str

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
MIN_KEY_LENGTH = 16
# The name `api.admin_api_key` gets among the file's keys (metrics, logs).
ADMIN_SETTING_KEY_NAME = "admin_api_key"


# --- routes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteRule:
    """What a request needs: `requirement`, and `route` (a bounded metric label)."""

    requirement: Requirement
    route: str


_EXACT: dict[str, RouteRule] = {
    "/healthz": RouteRule(OPEN, "health"),
    "/readyz": RouteRule(OPEN, "health"),
    "/v1/recommendations": RouteRule(Scope.RECOMMEND, "recommendations"),
    "/v1/events": RouteRule(Scope.EVENTS, "events"),
    "/v1/experiments": RouteRule(Scope.ADMIN, "experiments"),
    "/demo": RouteRule(Scope.DEBUG, "demo"),
    "/docs": RouteRule(ANY_KEY, "docs"),
    "/docs/oauth2-redirect": RouteRule(ANY_KEY, "docs"),
    "/redoc": RouteRule(ANY_KEY, "docs"),
    "/openapi.json": RouteRule(ANY_KEY, "docs"),
}
_PREFIXES: tuple[tuple[str, RouteRule], ...] = (
    ("/v1/admin/", RouteRule(Scope.ADMIN, "admin")),
    ("/v1/demo/", RouteRule(Scope.DEBUG, "demo")),
    ("/demo/", RouteRule(Scope.DEBUG, "demo")),
)
_OTHER = RouteRule(ANY_KEY, "other")
_FALSE = frozenset({"", "0", "false", "off", "no", "f", "n"})


def route_rule(path: str) -> RouteRule:
    """The rule of a route path (the path the router matches, after the app's root path). A path
    no route serves needs a valid key too, so that a caller without one learns nothing."""
    rule = _EXACT.get(path)
    if rule is not None:
        return rule
    for prefix, prefixed in _PREFIXES:
        if path.startswith(prefix):
            return prefixed
    return _OTHER


def asks_debug(query_string: bytes) -> bool:
    """True when a `debug` query parameter asks for stage timings (any value but a false one, as
    FastAPI reads booleans; a value it refuses gets its 422 after the scope check)."""
    if b"debug" not in query_string:
        return False
    for part in query_string.split(b"&"):
        name, _, value = part.partition(b"=")
        if name == b"debug" and value.decode("latin-1").strip().lower() not in _FALSE:
            return True
    return False


# --- keys ----------------------------------------------------------------------------------------


class KeyFileError(ValueError):
    """The keys file is not what docs/security.md describes; the message names the entry."""


@dataclass(frozen=True)
class ApiKey:
    """One accepted key: its name (logs, metrics), digest and scopes."""

    name: str
    digest: bytes  # sha256 of the key, 32 bytes
    scopes: frozenset[Scope]

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes


def key_digest(key: str) -> bytes:
    """sha256 of the key as UTF-8 (what the file stores, in hex)."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_entry(key: str, name: str, scopes: Iterable[str]) -> dict[str, Any]:
    """The keys-file entry of `key` (its hash, never the key); ValueError for a bad name, scope
    or a key too short or with characters a header cannot carry."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"name {name!r}: 1-64 letters, digits, '_', '.', '-'")
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"a key needs at least {MIN_KEY_LENGTH} characters (got {len(key)})")
    if not all(33 <= ord(c) <= 126 for c in key):
        raise ValueError("a key is printable ASCII without spaces (it travels in an HTTP header)")
    wanted = list(dict.fromkeys(scopes))
    unknown = [s for s in wanted if s not in Scope.__members__.values()]
    if unknown:
        raise ValueError(f"unknown scopes {unknown} (known: {[s.value for s in Scope]})")
    return {"name": name, "sha256": key_digest(key).hex(), "scopes": wanted}


def parse_keys(text: str) -> dict[bytes, ApiKey]:
    """The keys of a keys file, by digest: `{"keys": [{"name", "sha256", "scopes"}, ...]}` with
    unique names and hashes, known scopes and nothing else; KeyFileError names what is wrong."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyFileError(f"not JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(document, dict) or set(document) != {"keys"}:
        raise KeyFileError('expected an object with one field, "keys"')
    entries = document["keys"]
    if not isinstance(entries, list):
        raise KeyFileError('"keys" must be a list')
    keys: dict[bytes, ApiKey] = {}
    names: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"keys[{index}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "sha256", "scopes"}:
            raise KeyFileError(f'{where}: expected exactly the fields "name", "sha256", "scopes"')
        name, digest, scopes = entry["name"], entry["sha256"], entry["scopes"]
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise KeyFileError(f"{where}.name: 1-64 letters, digits, '_', '.', '-'")
        where = f"{where} ({name})"
        if name in names:
            raise KeyFileError(f"{where}: the name is used twice")
        if not isinstance(digest, str) or not SHA256_PATTERN.match(digest):
            raise KeyFileError(f"{where}.sha256: 64 lowercase hex digits (sha256 of the key)")
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise KeyFileError(f"{where}.scopes: a list of scope names")
        unknown = sorted(set(scopes) - {s.value for s in Scope})
        if unknown:
            raise KeyFileError(
                f"{where}.scopes: unknown {unknown} (known: {[s.value for s in Scope]})"
            )
        raw = bytes.fromhex(digest)
        if raw in keys:
            raise KeyFileError(f"{where}.sha256: the same key as {keys[raw].name}")
        names.add(name)
        keys[raw] = ApiKey(name, raw, frozenset(Scope(s) for s in scopes))
    return keys


def presented_key(headers: Mapping[bytes, bytes]) -> str | None:
    """The key of `Authorization: Bearer <key>`, else of `X-API-Key: <key>` (raw ASGI headers,
    lowercase names); None when neither carries one."""
    auth = headers.get(b"authorization")
    if auth is not None:
        scheme, _, token = auth.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    given = headers.get(b"x-api-key")
    if given is not None and given.strip():
        return given.decode("latin-1").strip()
    return None


FileSignature = tuple[int, int, int, int, int]


def _signature(path: Path) -> FileSignature | None:
    """What changes when the file is rewritten or its Secret volume swaps the symlink (stat follows
    it); None when there is no file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class KeyRing:
    """The accepted keys: the keys file's (re-read when it changes, checked with one `stat` at
    most every `check_interval` seconds of `clock`) plus `extra` (the admin key of the settings).

    A file that cannot be read or parsed keeps the keys read before it (none at the start: every
    key is refused until it is fixed): logged once per change and reported to `on_error`.
    Lookups hash the presented key and look the digest up: Python's dict hashes bytes with a
    per-process random key, so its timing says nothing about the stored digests, and the digest
    found is compared again in constant time. Only digests are held, never a key.
    """

    def __init__(
        self,
        path: Path | None,
        extra: Iterable[ApiKey] = (),
        *,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self._extra = {key.digest: key for key in extra}
        self._check_interval = check_interval
        self._clock = clock
        self._on_error = on_error
        self._file_keys: dict[bytes, ApiKey] = {}
        self._keys: dict[bytes, ApiKey] = dict(self._extra)
        self._seen: FileSignature | str | None = "unread"
        self._checked_at = -math.inf
        self.errors = 0
        self.refresh(force=True)

    @property
    def keys(self) -> Mapping[bytes, ApiKey]:
        return self._keys

    def lookup(self, presented: str) -> ApiKey | None:
        """The key `presented` is, or None when it is not an accepted key."""
        self.refresh()
        digest = key_digest(presented)
        found = self._keys.get(digest)
        if found is None or not hmac.compare_digest(found.digest, digest):
            return None
        return found

    def refresh(self, force: bool = False) -> bool:
        """Re-read the file if it changed since the last check; True when the keys changed."""
        if self.path is None:
            return False
        now = self._clock()
        if not force and now - self._checked_at < self._check_interval:
            return False
        self._checked_at = now
        signature = _signature(self.path)
        if signature == self._seen:
            return False
        self._seen = signature
        try:
            if signature is None:
                raise KeyFileError("no such file")
            text = self.path.read_text(encoding="utf-8")
            loaded = parse_keys(text)
        except (OSError, UnicodeDecodeError, KeyFileError) as exc:
            self.errors += 1
            kept = len(self._file_keys)
            logger.error(
                "API keys file %s refused (%s): keeping the %d keys read before",
                self.path,
                exc,
                kept,
            )
            if self._on_error is not None:
                self._on_error(str(exc))
            return False
        clash = sorted(k.name for d, k in loaded.items() if d in self._extra)
        if clash:
            logger.warning("keys %s of %s are also api.admin_api_key", clash, self.path)
        changed = loaded != self._file_keys
        self._file_keys = loaded
        self._keys = {**loaded, **self._extra}
        if changed:
            logger.info(
                "API keys from %s: %s",
                self.path,
                ", ".join(sorted(k.name for k in loaded.values())) or "none",
            )
        return changed


# --- command line --------------------------------------------------------------------------------


def cmd_hash(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip()
    try:
        entry = key_entry(key, args.name, [s.strip() for s in args.scopes.split(",") if s.strip()])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(entry))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        keys = parse_keys(Path(args.file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, KeyFileError) as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return 1
    for key in sorted(keys.values(), key=lambda k: k.name):
        print(f"{key.name}: {', '.join(sorted(key.scopes)) or '(no scopes)'}")
    return 0


def add_key_commands(sub: Any) -> None:
    """`hash` and `check` under an argparse subparsers object (here and in recserve-serve keys)."""
    h = sub.add_parser(
        "hash",
        help="read a key from stdin (one line) and print its keys-file entry (sha256, never the key)",
    )
    h.add_argument("--name", required=True, help="the key's name (logs, metrics, rate limit)")
    h.add_argument(
        "--scopes",
        required=True,
        help=f"comma-separated, of: {', '.join(s.value for s in Scope)}",
    )
    h.set_defaults(func=cmd_hash)
    c = sub.add_parser("check", help="validate a keys file and list its keys' names and scopes")
    c.add_argument("file", type=Path)
    c.set_defaults(func=cmd_check)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.auth",
        description="API keys of the recserve HTTP API (docs/security.md): hash a key into a "
        "keys-file entry, check a keys file.",
    )
    add_key_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
