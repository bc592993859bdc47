"""AliasWatcher: a version becomes current only once every stage took it; a bad bundle is refused for
good, a stage with no live replica only defers the swap to the next check."""

from __future__ import annotations

import asyncio

from serve_app.errors import BundleIntegrityError, StageUnavailable
from serve_app.models import AliasWatcher


class Activations:
    """activate() that answers from a script: each call pops the next outcome (None = success)."""

    def __init__(self, *outcomes: Exception | None) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[str] = []

    async def __call__(self, version: str) -> None:
        self.calls.append(version)
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome


def watcher(activate: Activations, version: str = "2") -> AliasWatcher:
    return AliasWatcher(
        resolve=lambda: version, activate=activate, interval_seconds=1.0, current="1"
    )


def test_a_stage_without_a_live_replica_defers_the_swap_and_the_next_check_makes_it() -> None:
    activate = Activations(StageUnavailable("ranker"), None)
    w = watcher(activate)
    first = asyncio.run(w.check())
    assert (first.current, first.changed) == ("1", False)  # the old version keeps serving
    assert w.refused == {}
    assert "deferred" in (w.last_error or "")
    second = asyncio.run(w.check())
    assert (second.current, second.changed) == ("2", True)
    assert activate.calls == ["2", "2"]
    assert w.last_error is None


def test_a_bundle_a_stage_cannot_load_is_refused_and_not_retried_until_forced() -> None:
    activate = Activations(BundleIntegrityError("ranker.json: checksum mismatch"), None)
    w = watcher(activate)
    asyncio.run(w.check())
    assert "2" in w.refused
    again = asyncio.run(w.check())
    assert (again.current, again.changed) == ("1", False)
    assert activate.calls == ["2"]  # not tried a second time
    forced = asyncio.run(w.check(force=True))
    assert (forced.current, forced.changed) == ("2", True)
    assert w.refused == {}


def test_the_first_check_is_signalled_whatever_its_outcome() -> None:
    """`checked` is what an Ingress replica's constructor waits on before Serve routes to it."""

    def unreachable() -> str:
        raise ConnectionError("registry down")

    async def scenario(w: AliasWatcher) -> tuple[bool, bool]:
        before = w.checked.is_set()
        await w.check()
        return before, w.checked.is_set()

    for w in (
        watcher(Activations(None)),  # loaded
        watcher(Activations(BundleIntegrityError("manifest mismatch"))),  # refused
        AliasWatcher(resolve=unreachable, activate=Activations(), interval_seconds=1.0),
    ):
        assert asyncio.run(scenario(w)) == (False, True)
