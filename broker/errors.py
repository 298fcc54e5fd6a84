"""One error catalog (STYLE.md 11): every error the API reports is a BrokerError with a code,
and every WebSocket close is a Disconnect with a close code (as centrifuge's errors.go and
disconnect.go: each error says whether the client should retry, each disconnect whether it
should reconnect).

`docs/errors.md` lists both; `broker.http.middleware` turns errors into the error body of
DESIGN.md §6, the WebSocket fronts (`broker.ws`) into error frames and Close frames.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from eventstore.base import (
    ConcurrencyError,
    EventNotEncodable,
    StoreUnavailable,
)


class BrokerError(Exception):
    code = "INTERNAL"
    status = 500
    retry = False  # whether the same request may succeed later (the client should retry)

    def __init__(
        self,
        message: str,
        *,
        details: list[Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.headers = headers or {}


class BadRequest(BrokerError):
    code, status = "BAD_REQUEST", 400


class ValidationFailed(BrokerError):
    code, status = "VALIDATION_ERROR", 422


class AuthenticationFailed(BrokerError):
    code, status = "AUTHENTICATION_ERROR", 401


class Forbidden(BrokerError):
    code, status = "AUTHORIZATION_ERROR", 403


class NotFound(BrokerError):
    code, status = "NOT_FOUND", 404


class MethodNotAllowed(BrokerError):
    code, status = "METHOD_NOT_ALLOWED", 405


class Conflict(BrokerError):
    code, status, retry = "CONFLICT", 409, True  # (a race: a retry sees the winner's result)


class PayloadTooLarge(BrokerError):
    code, status = "PAYLOAD_TOO_LARGE", 413


class RateLimited(BrokerError):
    code, status, retry = "RATE_LIMIT", 429, True


class Unavailable(BrokerError):
    code, status, retry = "SERVICE_UNAVAILABLE", 503, True


class CompactionUnavailable(BrokerError):
    """The log cannot be compacted as configured (no snapshots; a backend without it)."""

    code, status = "COMPACTION_UNAVAILABLE", 409


# Licensing (seed 002): 400s with the seed's French messages; an unknown key is NOT_FOUND.


class LicenseExpired(BrokerError):
    code, status = "LICENSE_EXPIRED", 400


class LicenseRevoked(BrokerError):
    code, status = "LICENSE_REVOKED", 400


class LicenseLimitReached(BrokerError):
    code, status = "LICENSE_LIMIT_REACHED", 400


class TenantInactive(BrokerError):
    code, status = "TENANT_INACTIVE", 400


class SlowConsumer(BrokerError):
    """A feed whose consumer fell too far behind, or whose socket did not take a frame in time
    (WebSocket and Server-Sent Events only: no HTTP response carries it)."""

    code, status, retry = "SLOW_CONSUMER", 503, True


# Every code an HTTP response may carry, for docs and tests.
CATALOG: dict[str, int] = {
    cls.code: cls.status
    for cls in (
        BrokerError,
        BadRequest,
        ValidationFailed,
        AuthenticationFailed,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Conflict,
        PayloadTooLarge,
        RateLimited,
        Unavailable,
        CompactionUnavailable,
        LicenseExpired,
        LicenseRevoked,
        LicenseLimitReached,
        TenantInactive,
    )
}

# The first (generic) code of each status wins: several 400 codes share one status.
_BY_STATUS = {status: code for code, status in reversed(CATALOG.items())}


def code_for_status(status: int) -> str:
    return _BY_STATUS.get(status, "INTERNAL" if status >= 500 else "BAD_REQUEST")


# Codes only the WebSocket and Server-Sent Events feeds send (docs/errors.md, "WebSocket errors").
STREAM_ONLY: tuple[type[BrokerError], ...] = (SlowConsumer,)


# --- what the log's errors mean to a client (the one mapping: HTTP and WebSocket alike) ---


def from_store(exc: BaseException) -> BrokerError | None:
    """The catalog's error for an error of the log; None for one a client cannot act on."""
    if isinstance(exc, ConcurrencyError):
        return Conflict("the resource was changed concurrently; retry")
    if isinstance(exc, EventNotEncodable):  # the edge checks first: a value it does not know
        return ValidationFailed(str(exc), details=[{"field": exc.path}])
    if isinstance(exc, StoreUnavailable):
        return Unavailable("the event log is unavailable; retry later")
    return None  # (a feed's SubscriberTooSlow: broker.services.eventlog.feed, SLOW_CONSUMER)


def internal() -> BrokerError:
    """What a client is told of an unexpected failure (the log has the traceback)."""
    return BrokerError("internal error")


# --- WebSocket closes ---


class Disconnect(NamedTuple):
    """A WebSocket close: its code (RFC 6455 §7.4; 4000-4999 are the broker's own), the reason
    sent with it, and whether the client should reconnect."""

    code: int
    reason: str
    reconnect: bool


# The node WebSocket (GET /api/v1/ws)
AUTH_FAILED = Disconnect(1008, "authentication failed", False)  # RFC 6455: policy violation
NODES_ONLY = Disconnect(1008, "nodes only", False)
TRY_AGAIN = Disconnect(1013, "server at capacity, try again later", True)  # RFC 6455 registry
REPLACED = Disconnect(4000, "replaced by a newer connection", False)  # by the same node's
DEREGISTERED = Disconnect(4003, "deregistered", False)
TOKEN_REVOKED = Disconnect(4401, "token revoked", False)  # logout, reuse, superseded login
SHUTDOWN = Disconnect(1001, "server shutting down", True)
# The operators' feed (GET /ws): the reason is the error frame's message sent before it
FEED_AUTH = Disconnect(4401, "authentication failed", False)  # no, bad, expired, revoked token
FEED_FORBIDDEN = Disconnect(4403, "missing permission", False)  # a token without events:read
FEED_SLOW = Disconnect(4408, "the feed fell too far behind the log", True)
FEED_UNAVAILABLE = Disconnect(1011, "the log cannot be read", True)
FEED_GOING_AWAY = Disconnect(1001, "the server is shutting down", True)

DISCONNECTS: dict[str, Disconnect] = {
    name: value for name, value in globals().items() if isinstance(value, Disconnect)
}
