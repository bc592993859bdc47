"""The one exception hierarchy: each error carries a short `code` that the ingress maps to HTTP.

Raised by any stage (bundle loading, features, request validation); only the ingress turns them into
responses, so nothing below it knows about status codes.
"""

from __future__ import annotations


class RecserveError(Exception):
    """Base of every error recserve raises on purpose; `code` is stable and safe to show clients."""

    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(RecserveError):
    """The client sent something invalid; `field` names the offending input when there is one."""

    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelUnavailable(RecserveError):
    """No usable model version: registry unreachable, alias unset, or nothing loaded."""

    code = "model_unavailable"


class FeatureStoreUnavailable(RecserveError):
    """The online feature store could not be read (callers may degrade instead of failing)."""

    code = "feature_store_unavailable"


class BundleIntegrityError(RecserveError):
    """A model bundle failed verification; `file` names the bundle file at fault when known."""

    code = "bundle_integrity"

    def __init__(self, message: str, *, file: str | None = None) -> None:
        super().__init__(f"{file}: {message}" if file else message)
        self.file = file


class Overloaded(RecserveError):
    """More requests are waiting than the graph can answer in time: refused at once (503 with
    Retry-After) rather than queued for seconds."""

    code = "overloaded"


class StageUnavailable(RecserveError):
    """A stage failed or missed its deadline and the request has no fallback around it (503)."""

    code = "stage_unavailable"

    def __init__(self, stage: str) -> None:
        super().__init__(f"the {stage} stage is unavailable, retry")
        self.stage = stage


class SpoolFull(RecserveError):
    """The event log is unavailable and the local spool has no room for the batch (503 with
    Retry-After: nothing of the batch was accepted, the client retries it whole)."""

    code = "event_spool_full"

    def __init__(self, message: str, retry_after_seconds: int = 5) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds

    def __reduce__(self) -> tuple[type[SpoolFull], tuple[str, int]]:
        # Crosses the Ray handle pickled: keep the Retry-After it carries.
        return (SpoolFull, (self.message, self.retry_after_seconds))


class EventsUnavailable(RecserveError):
    """The event writer did not take a batch: its replica is dead, restarting or did not answer in
    time (503 with Retry-After). Some of the batch may have been logged: a retry is safe, events
    are recognised by id (send an `event_id`)."""

    code = "events_unavailable"
