"""API keys, scopes (`serve_app.auth`) and the token bucket (`serve_app.rate_limit`), pure: the keys file's format and its errors,
hashing (a published SHA-256 test vector), the route table, re-reading a Kubernetes Secret volume after
its symlink swap, a broken file keeping the keys read before, and the bucket under a hand-driven clock.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from serve_app import auth
from serve_app.auth import (
    ANY_KEY,
    OPEN,
    ApiKey,
    KeyFileError,
    KeyRing,
    Scope,
    asks_debug,
    key_digest,
    key_entry,
    parse_keys,
    presented_key,
    route_rule,
)
from serve_app.rate_limit import RateLimiter, TokenBucket, retry_after_header
from tests.manual_clock import Clock

# FIPS 180-2, appendix B.2: SHA-256 of this 56-character message.
NIST_MESSAGE = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
NIST_SHA256 = "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"

CLIENT_KEY = "client-key-0123456789"
OPS_KEY = "ops-key-abcdefghijklmnop"


def entry(key: str, name: str, *scopes: str) -> dict[str, Any]:
    return key_entry(key, name, scopes)


def keys_json(*entries: dict[str, Any]) -> str:
    return json.dumps({"keys": list(entries)})


# --- hashing and the file format -----------------------------------------------------------------


def test_an_entry_holds_the_sha256_of_the_key_never_the_key() -> None:
    made = key_entry(NIST_MESSAGE, "client", ["recommend", "events"])
    assert made == {"name": "client", "sha256": NIST_SHA256, "scopes": ["recommend", "events"]}
    assert NIST_MESSAGE not in json.dumps(made)
    assert key_digest(NIST_MESSAGE) == bytes.fromhex(NIST_SHA256)


@pytest.mark.parametrize(
    ("key", "name", "scopes", "message"),
    [
        ("short", "client", ["recommend"], "at least 16"),
        ("has a space inside it!!", "client", ["recommend"], "printable ASCII"),
        ("clé-non-ascii-0123456", "client", ["recommend"], "printable ASCII"),
        (CLIENT_KEY, "bad name", ["recommend"], "name"),
        (CLIENT_KEY, "client", ["recommend", "root"], "unknown scopes ['root']"),
    ],
)
def test_an_entry_refuses_weak_keys_bad_names_and_unknown_scopes(
    key: str, name: str, scopes: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        key_entry(key, name, scopes)


def test_a_keys_file_gives_each_key_its_name_and_scopes() -> None:
    keys = parse_keys(
        keys_json(
            entry(CLIENT_KEY, "client", "recommend", "events"),
            entry(OPS_KEY, "ops", "admin", "debug"),
            {"name": "docs-only", "sha256": "0" * 64, "scopes": []},
        )
    )
    by_name = {k.name: k for k in keys.values()}
    assert by_name["client"].scopes == {Scope.RECOMMEND, Scope.EVENTS}
    assert by_name["ops"].scopes == {Scope.ADMIN, Scope.DEBUG}
    assert by_name["docs-only"].scopes == frozenset()
    assert keys[key_digest(CLIENT_KEY)].name == "client"
    assert parse_keys('{"keys": []}') == {}


GOOD = {"name": "a", "sha256": "a" * 64, "scopes": ["recommend"]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON: line 1"),
        ("[]", 'one field, "keys"'),
        ('{"keys": [], "version": 2}', 'one field, "keys"'),
        ('{"keys": {}}', '"keys" must be a list'),
        (keys_json({**GOOD, "comment": "x"}), "keys[0]: expected exactly the fields"),
        (keys_json({"name": "a", "sha256": "a" * 64}), "keys[0]: expected exactly the fields"),
        (keys_json({**GOOD, "name": "no spaces"}), "keys[0].name"),
        (keys_json({**GOOD, "name": 7}), "keys[0].name"),
        (keys_json(GOOD, {**GOOD, "sha256": "b" * 64}), "keys[1] (a): the name is used twice"),
        (keys_json({**GOOD, "sha256": "A" * 64}), "keys[0] (a).sha256: 64 lowercase hex"),
        (keys_json({**GOOD, "sha256": "a" * 63}), "keys[0] (a).sha256"),
        (keys_json({**GOOD, "scopes": "recommend"}), "keys[0] (a).scopes: a list"),
        (keys_json({**GOOD, "scopes": ["recommend", "root"]}), "unknown ['root']"),
        (keys_json(GOOD, {**GOOD, "name": "b"}), "keys[1] (b).sha256: the same key as a"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_entry(text: str, message: str) -> None:
    with pytest.raises(KeyFileError) as raised:
        parse_keys(text)
    assert message in str(raised.value)


def test_the_hash_command_reads_the_key_from_stdin_and_prints_an_entry(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from serve_app.cli import main as serve_cli

    monkeypatch.setattr("sys.stdin", io.StringIO(NIST_MESSAGE + "\n"))
    assert auth.main(["hash", "--name", "client", "--scopes", "recommend,events"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"name": "client", "sha256": NIST_SHA256, "scopes": ["recommend", "events"]}
    # The same through recserve-serve, and the file they make passes `check`.
    monkeypatch.setattr("sys.stdin", io.StringIO(OPS_KEY + "\n"))
    assert serve_cli(["keys", "hash", "--name", "ops", "--scopes", "admin"]) == 0
    ops = json.loads(capsys.readouterr().out)
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [printed, ops]}))
    assert auth.main(["check", str(path)]) == 0
    assert capsys.readouterr().out == "client: events, recommend\nops: admin\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert auth.main(["hash", "--name", "c", "--scopes", "recommend"]) == 2
    assert "at least 16" in capsys.readouterr().err
    path.write_text('{"keys": [{"name": "x"}]}')
    assert auth.main(["check", str(path)]) == 1
    assert "keys[0]" in capsys.readouterr().err


# --- requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "requirement", "route"),
    [
        ("/healthz", OPEN, "health"),
        ("/readyz", OPEN, "health"),
        ("/v1/recommendations", Scope.RECOMMEND, "recommendations"),
        ("/v1/events", Scope.EVENTS, "events"),
        ("/v1/admin/reload", Scope.ADMIN, "admin"),
        ("/v1/admin/anything-later", Scope.ADMIN, "admin"),
        ("/v1/experiments", Scope.ADMIN, "experiments"),
        ("/demo", Scope.DEBUG, "demo"),
        ("/demo/ops", Scope.DEBUG, "demo"),
        ("/demo/static/demo.js", Scope.DEBUG, "demo"),
        ("/v1/demo/users/u1/vectors", Scope.DEBUG, "demo"),
        ("/docs", ANY_KEY, "docs"),
        ("/redoc", ANY_KEY, "docs"),
        ("/openapi.json", ANY_KEY, "docs"),
        ("/v2/recommendations", ANY_KEY, "other"),
        ("/healthz/", ANY_KEY, "other"),  # not the open route: exact match only
        ("/v1/adminx", ANY_KEY, "other"),
        ("/", ANY_KEY, "other"),
    ],
)
def test_each_route_needs_its_scope(path: str, requirement: str, route: str) -> None:
    rule = route_rule(path)
    assert (rule.requirement, rule.route) == (requirement, route)


@pytest.mark.parametrize(
    ("query", "asks"),
    [
        (b"", False),
        (b"debug=1", True),
        (b"debug=true", True),
        (b"debug=yes", True),
        (b"a=1&debug=on", True),
        (b"debug=0", False),
        (b"debug=false", False),
        (b"debug=False", False),
        (b"debug=", False),
        (b"debug=0&debug=1", True),  # any asking value asks
        (b"nodebug=1", False),
        (b"debugging=1", False),
    ],
)
def test_a_debug_query_parameter_asks_for_timings(query: bytes, asks: bool) -> None:
    assert asks_debug(query) is asks


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({b"authorization": b"Bearer abc"}, "abc"),
        ({b"authorization": b"bearer  abc "}, "abc"),
        ({b"x-api-key": b"xyz"}, "xyz"),
        ({b"authorization": b"Bearer abc", b"x-api-key": b"xyz"}, "abc"),
        ({b"authorization": b"Basic dXNlcjpwYXNz", b"x-api-key": b"xyz"}, "xyz"),
        ({b"authorization": b"Basic dXNlcjpwYXNz"}, None),
        ({b"authorization": b"Bearer "}, None),
        ({b"x-api-key": b"  "}, None),
        ({}, None),
    ],
)
def test_the_key_comes_from_a_bearer_token_or_x_api_key(
    headers: dict[bytes, bytes], key: str | None
) -> None:
    assert presented_key(headers) == key


# --- the key ring: re-reading a Secret volume ----------------------------------------------------


class SecretVolume:
    """A directory laid out as the kubelet keeps a Secret volume: `keys.json` -> `..data/keys.json`,
    `..data` -> a timestamped directory; an update writes a new directory and swaps `..data`
    atomically (rename of a new symlink over it), then removes the old directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir(parents=True, exist_ok=True)
        (root / "keys.json").symlink_to("..data/keys.json")

    @property
    def path(self) -> Path:
        return self.root / "keys.json"

    def write(self, text: str) -> None:
        self.generation += 1
        fresh = self.root / f"..2026_01_01_00_00_{self.generation:02d}"
        fresh.mkdir()
        (fresh / "keys.json").write_text(text)
        old = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        link = self.root / "..data_tmp"
        link.symlink_to(fresh.name)
        os.replace(link, self.root / "..data")
        if old is not None:
            for child in old.iterdir():
                child.unlink()
            old.rmdir()


def test_the_ring_finds_keys_by_hash_and_nothing_else(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path / "api-keys")
    volume.write(keys_json(entry(CLIENT_KEY, "client", "recommend")))
    admin = ApiKey("admin_api_key", key_digest(OPS_KEY), frozenset({Scope.ADMIN}))
    ring = KeyRing(volume.path, [admin])
    found = ring.lookup(CLIENT_KEY)
    assert found is not None and found.name == "client" and found.scopes == {Scope.RECOMMEND}
    assert ring.lookup(OPS_KEY) == admin
    assert ring.lookup(CLIENT_KEY + "x") is None
    assert ring.lookup(key_digest(CLIENT_KEY).hex()) is None  # the stored hash is not a key
    assert ring.lookup("") is None


def test_a_swapped_secret_is_read_after_the_check_interval_only(tmp_path: Path) -> None:
    clock = Clock()
    volume = SecretVolume(tmp_path / "api-keys")
    volume.write(keys_json(entry(CLIENT_KEY, "client", "recommend")))
    ring = KeyRing(volume.path, check_interval=1.0, clock=clock)
    assert ring.lookup(CLIENT_KEY) is not None
    # Rotation: the new key added, the old one removed, in one update of the Secret.
    volume.write(keys_json(entry(OPS_KEY, "client-2026", "recommend", "events")))
    clock.now += 0.5
    assert ring.lookup(CLIENT_KEY) is not None and ring.lookup(OPS_KEY) is None  # not checked yet
    clock.now += 0.5
    new = ring.lookup(OPS_KEY)
    assert new is not None and new.name == "client-2026"
    assert ring.lookup(CLIENT_KEY) is None
    assert ring.errors == 0


def test_a_broken_file_keeps_the_keys_read_before_and_is_counted_once(tmp_path: Path) -> None:
    clock = Clock()
    reported: list[str] = []
    volume = SecretVolume(tmp_path / "api-keys")
    volume.write(keys_json(entry(CLIENT_KEY, "client", "recommend")))
    ring = KeyRing(volume.path, clock=clock, on_error=reported.append)
    volume.write('{"keys": [{"name": "half-written"')
    for _ in range(3):  # checked three times, one change: one error
        clock.now += 1.0
        assert ring.lookup(CLIENT_KEY) is not None
    assert ring.errors == 1 and len(reported) == 1 and "not JSON" in reported[0]
    volume.write(keys_json(entry(CLIENT_KEY, "client", "recommend"), {**GOOD, "scopes": ["root"]}))
    clock.now += 1.0
    assert ring.lookup(CLIENT_KEY) is not None
    assert ring.errors == 2 and "unknown ['root']" in reported[1]
    volume.write(keys_json(entry(OPS_KEY, "ops", "admin")))  # fixed: read
    clock.now += 1.0
    assert ring.lookup(OPS_KEY) is not None and ring.lookup(CLIENT_KEY) is None
    assert ring.errors == 2


def test_a_missing_file_accepts_no_key_until_it_appears(tmp_path: Path) -> None:
    clock = Clock()
    reported: list[str] = []
    path = tmp_path / "keys.json"
    admin = ApiKey("admin_api_key", key_digest(OPS_KEY), frozenset({Scope.ADMIN}))
    ring = KeyRing(path, [admin], clock=clock, on_error=reported.append)
    assert ring.errors == 1 and reported == ["no such file"]
    assert ring.lookup(CLIENT_KEY) is None
    assert ring.lookup(OPS_KEY) == admin  # the settings' admin key does not depend on the file
    path.write_text(keys_json(entry(CLIENT_KEY, "client", "events")))
    clock.now += 1.0
    assert ring.lookup(CLIENT_KEY) is not None
    path.unlink()  # removed: the keys read before stay
    clock.now += 1.0
    assert ring.lookup(CLIENT_KEY) is not None and ring.errors == 2


def test_a_file_rewritten_in_place_is_read_again(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "keys.json"
    path.write_text(keys_json(entry(CLIENT_KEY, "client", "events")))
    ring = KeyRing(path, clock=clock)
    path.write_text(keys_json(entry(CLIENT_KEY, "client", "events", "recommend", "debug")))
    clock.now += 1.0
    found = ring.lookup(CLIENT_KEY)
    assert found is not None and found.scopes == {Scope.EVENTS, Scope.RECOMMEND, Scope.DEBUG}


# --- the token bucket ----------------------------------------------------------------------------


def test_the_bucket_lets_a_burst_through_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    # Empty: the next token in 1 / 2 s.
    assert bucket.take() == pytest.approx(0.5)
    clock.now += 0.25  # half a token
    assert bucket.take() == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.5)
    clock.now += 100.0  # refills up to the burst, no further
    assert [bucket.take() for _ in range(4)][-1] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("wait", "header"), [(0.001, "1"), (0.5, "1"), (1.0, "1"), (1.01, "2"), (4.5, "5")]
)
def test_retry_after_is_whole_seconds_rounded_up_at_least_one(wait: float, header: str) -> None:
    assert retry_after_header(wait) == header


def test_each_key_has_its_own_bucket_and_removed_keys_lose_theirs() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=0.5, burst=None, clock=clock)  # burst: ceil(0.5) = 1
    a, b = key_digest(CLIENT_KEY), key_digest(OPS_KEY)
    assert limiter.wait(a) == 0.0
    assert limiter.wait(a) == pytest.approx(2.0)  # one token every 2 s
    assert limiter.wait(b) == 0.0
    limiter.forget_except([b])
    assert limiter.wait(a) == 0.0  # a fresh bucket
    assert limiter.wait(b) == pytest.approx(2.0)
    off = RateLimiter(rate=0.0, burst=None, clock=clock)
    assert not off.enabled and all(off.wait(a) == 0.0 for _ in range(1000))
