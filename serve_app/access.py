"""Access control of the Ingress's HTTP API: `Access` applies `serve_app.auth`'s keys and scopes and
`serve_app.rate_limit`'s buckets; `Guard`, an ASGI middleware in front of everything (the hot route included), refuses a
request before any of it is read.

Built by `serve_app.ingress.create_api` from `ApiConfig`; the route's own code asks `Access` about
what only the body says (`"explain": true`). Refusals answer in `serve_app.http_errors`' shape and are
counted by route in `RequestMetrics`. With `api.auth.enabled` false it lets everything through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from serve_app.auth import (
    ADMIN_SETTING_KEY_NAME,
    ANY_KEY,
    OPEN,
    ApiKey,
    KeyRing,
    Scope,
    asks_debug,
    key_digest,
    presented_key,
    route_rule,
)
from serve_app.config import ApiConfig
from serve_app.http_errors import error_response
from serve_app.metrics import RequestMetrics
from serve_app.rate_limit import RateLimiter, retry_after_header

logger = logging.getLogger(__name__)

AsgiScope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[AsgiScope, Receive, Send], Awaitable[None]]

# Where the Guard leaves the caller's key in the ASGI scope (an extension key: per request).
API_KEY_SCOPE = "recserve.api_key"
CHALLENGE = 'Bearer realm="recserve"'
MISSING_KEY = "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


def route_path(scope: AsgiScope) -> str:
    """The path the router matches: the request's path after the app's root path (Serve's
    route prefix), as Starlette's routing computes it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


def caller_key(scope: AsgiScope) -> ApiKey | None:
    """The key the Guard accepted for this request (None with auth off)."""
    key: ApiKey | None = scope.get(API_KEY_SCOPE)
    return key


class Access:
    """The Ingress replica's access state: accepted keys (re-read as the keys file changes), a
    token bucket per key, and the counters of refusals. `clock`: monotonic seconds (tests)."""

    def __init__(
        self,
        config: ApiConfig,
        metrics: RequestMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = config.auth.enabled
        self.explain_enabled = config.explain_enabled
        self._metrics = metrics
        extra = []
        if config.admin_api_key is not None:
            secret = config.admin_api_key.get_secret_value()
            extra.append(
                ApiKey(ADMIN_SETTING_KEY_NAME, key_digest(secret), frozenset({Scope.ADMIN}))
            )
        on_error = metrics.key_file_error if metrics is not None else None
        self.keys = KeyRing(
            config.auth.keys_file if self.enabled else None,
            extra,
            check_interval=config.auth.check_interval_seconds,
            clock=clock,
            on_error=on_error,
        )
        limit = config.rate_limit
        self.limiter = RateLimiter(limit.requests_per_second, limit.burst, clock)
        self._keys_seen = self.keys.keys

    def refused(self, route: str, status: int, key: ApiKey | None) -> None:
        if self._metrics is not None:
            self._metrics.refused(route, status, key.name if key is not None else "")

    def check(self, scope: AsgiScope) -> JSONResponse | None:
        """None when the request may go on (its key left in the scope), else the refusal."""
        rule = route_rule(route_path(scope))
        if rule.requirement == OPEN:
            return None
        presented = presented_key(dict(scope.get("headers") or []))
        if presented is None:
            self.refused(rule.route, 401, None)
            return error_response(
                401, "unauthorized", MISSING_KEY, headers={"WWW-Authenticate": CHALLENGE}
            )
        key = self.keys.lookup(presented)
        if self.keys.keys is not self._keys_seen:  # re-read: buckets of removed keys go
            self._keys_seen = self.keys.keys
            self.limiter.forget_except(self._keys_seen)
        if key is None:
            self.refused(rule.route, 401, None)
            return error_response(
                401,
                "unauthorized",
                "unknown API key",
                headers={"WWW-Authenticate": f'{CHALLENGE}, error="invalid_token"'},
            )
        if rule.requirement != ANY_KEY and not key.allows(Scope(rule.requirement)):
            return self.forbidden(
                rule.route, key, Scope(rule.requirement), f"the {rule.route} routes"
            )
        timings = rule.route == "recommendations" and asks_debug(scope.get("query_string", b""))
        if timings and not key.allows(Scope.DEBUG):
            return self.forbidden(rule.route, key, Scope.DEBUG, "?debug=1", "debug")
        wait = self.limiter.wait(key.digest)
        if wait > 0:
            self.refused(rule.route, 429, key)
            retry = retry_after_header(wait)
            return error_response(
                429,
                "rate_limited",
                f"more than {self.limiter.rate:g} requests/s (burst {self.limiter.burst}) for this "
                f"key: retry after {retry} s",
                headers={"Retry-After": retry},
            )
        scope[API_KEY_SCOPE] = key
        return None

    def forbidden(
        self, route: str, key: ApiKey, needed: Scope, what: str, field: str | None = None
    ) -> JSONResponse:
        self.refused(route, 403, key)
        return error_response(
            403,
            "forbidden",
            f"this API key lacks the scope '{needed.value}' needed by {what}",
            field,
            headers={
                "WWW-Authenticate": f'{CHALLENGE}, error="insufficient_scope", scope="{needed.value}"'
            },
        )

    def explain_refusal(
        self, key: ApiKey | None, route: str = "recommendations"
    ) -> JSONResponse | None:
        """Why `"explain": true` (a user's seen items and vectors) is refused to `key`, or None."""
        if not self.explain_enabled:
            self.refused(route, 403, key)
            return error_response(
                403,
                "explain_disabled",
                "explain traces are turned off (api.explain_enabled)",
                "explain",
            )
        if self.enabled and (key is None or not key.allows(Scope.DEBUG)):
            if key is None:  # only when a route runs without the Guard: refuse, never allow
                self.refused(route, 403, None)
                return error_response(
                    403, "forbidden", "explain needs an API key with scope 'debug'", "explain"
                )
            return self.forbidden(route, key, Scope.DEBUG, "explain traces", "explain")
        return None


class Guard:
    """ASGI middleware: every HTTP request but /healthz and /readyz needs a key with its route's
    scope (401, 403) and a token of its key's bucket (429), when auth is on."""

    def __init__(self, app: AsgiApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.access.enabled:
            refusal = self.access.check(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def document_keys(app: FastAPI) -> None:
    """Declare the two ways to send a key in the app's OpenAPI document (Swagger UI's Authorize
    button; schema-driven clients and fuzzers read it), the health checks exempt. The document is
    built at its first request, so routes added later (the demo's) are in it."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API key"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
            schema["security"] = [{"bearer": []}, {"apiKey": []}]
            for path, operations in schema.get("paths", {}).items():
                if route_rule(path).requirement == OPEN:
                    for operation in operations.values():
                        operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
