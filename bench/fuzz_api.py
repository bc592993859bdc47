"""Does any request the API's own schema allows, or breaks in one place, get a 5xx? Schema-driven fuzzing.

schemathesis reads the server's `/openapi.json`; for every operation it generates requests that conform
to the schema (positive) and requests that violate it somewhere (negative: wrong types, out-of-range
numbers, missing or extra fields, odd strings in ids, query and headers), each sent once with the API key
(`Authorization: Bearer <key>`; harmless while auth is off). A fixed case budget is shared over the
(operation, mode) pairs, round after round, until it is spent or every pair is exhausted (an operation
without parameters has one positive case). The events' items, which the route validates one by one and
so does not describe, are fuzzed as `Event`s (`with_event_items`). Per operation: cases, 2xx, 4xx, 5xx, errors not in the API's
error shape (`{"error": {"code", "message", "field"}}`, never a stack trace) and transport errors (a
dropped connection). Exit status 1 on any 5xx or transport error.

The same `fuzz()` runs in CI against the in-process app (tests/integration/test_api_fuzz.py, a few
hundred cases); this script runs it against a served graph, e.g.
    .venv/bin/recserve-serve demo --data-dir DIR --port 8000 &
    .venv/bin/python bench/fuzz_api.py --url http://127.0.0.1:8000 --cases 2000 --key "$KEY"
Prints a table and writes bench/results/fuzz_api.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_file import write_results  # noqa: E402

MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
# An error body whose text has one of these leaks an implementation detail.
LEAKS = ("Traceback", 'File "/', "Exception:")


@dataclass(frozen=True)
class Outcome:
    """One request and what came back: status 0 is a transport error (no response)."""

    operation: str
    mode: str
    status: int
    shaped: bool  # a success, or an error in the API's error shape without a leak
    request: str  # method, path, query and a prefix of the body, for reproducing a failure
    response: str  # a prefix of the body (or the transport error)


@dataclass
class OperationReport:
    operation: str
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    misshaped: int = 0
    skipped: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        count = self.statuses
        return {
            "operation": self.operation,
            "cases": self.cases,
            "2xx": sum(n for s, n in count.items() if 200 <= s < 300),
            "4xx": sum(n for s, n in count.items() if 400 <= s < 500),
            "5xx": sum(n for s, n in count.items() if s >= 500),
            "transport_errors": count.get(0, 0),
            "misshaped_errors": self.misshaped,
            "statuses": {str(s): n for s, n in sorted(count.items())},
            "skipped": self.skipped,
        }


@dataclass
class FuzzReport:
    operations: dict[str, OperationReport]
    failures: list[Outcome]  # every 5xx, misshaped error and transport error
    seconds: float

    @property
    def cases(self) -> int:
        return sum(r.cases for r in self.operations.values())

    @property
    def server_errors(self) -> int:
        return sum(n for r in self.operations.values() for s, n in r.statuses.items() if s >= 500)

    @property
    def server_failures(self) -> list[Outcome]:
        """5xx and dropped connections: what fails a run (a misshaped 4xx is reported, see main)."""
        return [f for f in self.failures if f.status >= 500 or f.status == 0]


def with_event_items(raw: dict[str, Any]) -> dict[str, Any]:
    """The API's OpenAPI document with `POST /v1/events`' items described as `Event`s.

    The route takes `events: list[Any]` (each event is validated alone, so one bad event is
    rejected by index and the others kept) and so publishes no schema for an event: generated from
    the document alone, every event would be junk and none would reach the event writer. Here the
    items get `serve_app.schemas.Event`'s schema, with the id pattern its validator enforces; left
    as published when the document describes the items itself."""
    from serve_app.schemas import ID_PATTERN, Event

    schemas = raw.get("components", {}).get("schemas", {})
    events = schemas.get("EventsRequest", {}).get("properties", {}).get("events")
    if not isinstance(events, dict) or events.get("items"):
        return raw
    event = Event.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in event.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    for name in ("user_id", "item_id"):
        event["properties"][name]["pattern"] = ID_PATTERN.pattern
    schemas.setdefault("Event", event)
    events["items"] = {"$ref": "#/components/schemas/Event"}
    return raw


def well_shaped(status: int, body: str) -> bool:
    """A success, or the API's error shape with no stack trace in it."""
    if any(leak in body for leak in LEAKS):
        return False
    if status < 400:
        return True
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and {"code", "message"} <= set(error)


def describe_request(case: Any) -> str:
    body = "" if case.body is None or type(case.body).__name__ == "NotSet" else repr(case.body)
    return f"{case.method} {case.formatted_path} query={case.query!r:.300} body={body:.300}"


def call_case(
    case: Any, operation: str, mode: str, send: Callable[[Any], tuple[int, str]]
) -> Outcome:
    """Send `case`; a transport error is an outcome (status 0), never an exception."""
    try:
        status, text = send(case)
    except Exception as exc:  # the server dropped the connection or never answered
        return Outcome(operation, mode, 0, False, describe_request(case), repr(exc)[:300])
    return Outcome(
        operation, mode, status, well_shaped(status, text), describe_request(case), text[:300]
    )


def _runner(
    op: Any,
    mode: GenerationMode,
    examples: int,
    seed: int,
    send: Callable[[Any], tuple[int, str]],
    record: list[Outcome],
) -> Callable[[], None]:
    """A hypothesis test sending up to `examples` cases of `op` in `mode`, appending to `record`;
    it never fails (so hypothesis never shrinks: every case is a new request)."""

    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        record.append(call_case(case, op.label, mode.value, send))

    return run  # type: ignore[no-any-return]


def fuzz(
    schema: Any,
    cases: int,
    send: Callable[[Any], tuple[int, str]],
    seed: int = 0,
    log: Callable[[str], None] = lambda line: None,
) -> FuzzReport:
    """At least `cases` requests (unless every operation is exhausted first) over every operation
    of `schema` (a schemathesis schema), positive and negative, sent with `send(case) -> (status,
    body)`."""
    started = time.perf_counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    reports = {op.label: OperationReport(op.label) for op in operations}
    failures: list[Outcome] = []
    active = [(op, mode) for op in operations for mode in MODES]
    total, round_no = 0, 0
    while total < cases and active:
        share = math.ceil((cases - total) / len(active))
        still: list[tuple[Any, GenerationMode]] = []
        for index, (op, mode) in enumerate(active):
            report = reports[op.label]
            outcomes: list[Outcome] = []
            run = _runner(
                op, mode, share, seed * 1_000_003 + round_no * 1_009 + index, send, outcomes
            )
            exhausted = False
            try:
                run()
            except Exception as exc:  # e.g. nothing negative to generate for a bare GET
                report.skipped.append(f"{mode.value}: {type(exc).__name__}: {str(exc)[:120]}")
                exhausted = True
            for outcome in outcomes:
                report.cases += 1
                report.statuses[outcome.status] += 1
                report.misshaped += int(outcome.status != 0 and not outcome.shaped)
                if outcome.status >= 500 or outcome.status == 0 or not outcome.shaped:
                    failures.append(outcome)
            total += len(outcomes)
            if not exhausted and len(outcomes) >= share:  # fewer: no distinct cases left
                still.append((op, mode))
            log(f"round {round_no}: {op.label} {mode.value}: {len(outcomes)} cases ({total} total)")
        active, round_no = still, round_no + 1
    return FuzzReport(reports, failures, time.perf_counter() - started)


def print_report(report: FuzzReport) -> None:
    header = (
        f"{'operation':<34}{'cases':>7}{'2xx':>6}{'4xx':>6}{'5xx':>5}{'transport':>10}{'shape':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, op in sorted(report.operations.items()):
        row = op.row()
        print(
            f"{name:<34}{row['cases']:>7}{row['2xx']:>6}{row['4xx']:>6}{row['5xx']:>5}"
            f"{row['transport_errors']:>10}{row['misshaped_errors']:>6}"
        )
    print(
        f"{report.cases} cases in {report.seconds:.0f} s: {report.server_errors} server errors (5xx), "
        f"{len(report.server_failures)} 5xx or dropped connections, "
        f"{len(report.failures) - len(report.server_failures)} errors outside the API's shape"
    )
    for failure in report.failures[:20]:
        print(f"  {failure.status} {failure.request}\n      -> {failure.response}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--cases", type=int, default=2000, help="requests to send, at least")
    parser.add_argument(
        "--key",
        default=os.environ.get("RECSERVE_API_KEY"),
        help="API key sent as 'Authorization: Bearer <key>' (default: $RECSERVE_API_KEY; none: no header)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="hypothesis seed (same seed, same cases)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "fuzz_api.json",
        help="results JSON",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print progress per round")
    args = parser.parse_args(argv)

    import requests
    import schemathesis

    session = requests.Session()
    document = session.get(f"{args.url.rstrip('/')}/openapi.json", timeout=args.timeout)
    document.raise_for_status()
    schema = schemathesis.openapi.from_dict(with_event_items(document.json()))
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}

    def send(case: Any) -> tuple[int, str]:
        response = case.call(
            base_url=args.url, session=session, headers=headers, timeout=args.timeout
        )
        return response.status_code, response.text

    report = fuzz(
        schema, args.cases, send, args.seed, log=print if args.verbose else lambda _: None
    )
    print_report(report)
    params = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "key"})
    params.key = "set" if args.key else None  # never the key itself in a results file
    write_results(
        args.out,
        "fuzz_api",
        params,
        [op.row() for _, op in sorted(report.operations.items())],
        cases=report.cases,
        server_errors=report.server_errors,
        transport_errors=sum(f.status == 0 for f in report.failures),
        misshaped_errors=len(report.failures) - len(report.server_failures),
        seconds=round(report.seconds, 1),
        failures=[asdict(f) for f in report.failures[:50]],
    )
    # A misshaped 4xx is printed but does not fail the run: in front of a served graph it can come
    # from the HTTP proxy rather than the app (Serve's HAProxy answers an over-long request line
    # with its own HTML 400 page). The in-process test holds the app itself to the shape.
    return 1 if report.server_failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
