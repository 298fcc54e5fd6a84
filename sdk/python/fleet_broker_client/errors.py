"""One exception hierarchy for everything the SDK raises.

`ApiError` subclasses map the server's `error.code` (docs/errors.md); `TransportError` is a
failure to reach the server (retryable); `SessionRevoked`, `NodeDeregistered` and
`ConnectionReplaced` are states of the node's login or WebSocket that retrying cannot fix.
"""

from __future__ import annotations

from typing import Any


class BrokerClientError(Exception):
    """Base of every error the SDK raises."""


class TransportError(BrokerClientError):
    """The server could not be reached, or the connection broke before an answer."""


class ApiError(BrokerClientError):
    """The server answered with its error body. `code` is `error.code` (docs/errors.md)."""

    code = "ERROR"

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[Any] | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.request_id = request_id
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status in (429, 502, 503, 504)


class BadRequest(ApiError):
    code = "BAD_REQUEST"


class ValidationError(ApiError):
    code = "VALIDATION_ERROR"


class AuthenticationError(ApiError):
    code = "AUTHENTICATION_ERROR"


class AuthorizationError(ApiError):
    code = "AUTHORIZATION_ERROR"


class NotFound(ApiError):
    code = "NOT_FOUND"


class MethodNotAllowed(ApiError):
    code = "METHOD_NOT_ALLOWED"


class Conflict(ApiError):
    code = "CONFLICT"


class PayloadTooLarge(ApiError):
    code = "PAYLOAD_TOO_LARGE"


class RateLimited(ApiError):
    code = "RATE_LIMIT"


class ServiceUnavailable(ApiError):
    code = "SERVICE_UNAVAILABLE"


class InternalError(ApiError):
    code = "INTERNAL"


class LicenseError(ApiError):
    """A license validation, update check or tenant telemetry refused (seed 002)."""


class LicenseExpired(LicenseError):
    code = "LICENSE_EXPIRED"


class LicenseRevoked(LicenseError):
    code = "LICENSE_REVOKED"


class LicenseLimitReached(LicenseError):
    code = "LICENSE_LIMIT_REACHED"


class TenantInactive(LicenseError):
    code = "TENANT_INACTIVE"


class SessionRevoked(BrokerClientError):
    """The node's login was revoked (a refresh token presented twice, a logout, too many
    logins, a deregistration): its tokens are void. Log in again (`Node.login()`) once the
    cause is understood: a reused refresh token means it may have been stolen."""


class NodeDeregistered(SessionRevoked):
    """The node was deregistered by an operator (WebSocket close 4003)."""


class ConnectionReplaced(BrokerClientError):
    """Another connection of this node took over its WebSocket (close 4000)."""


class NodeIdTaken(Conflict):
    """Registration refused: the node id belongs to another key."""


class ChecksumMismatch(BrokerClientError):
    """A downloaded update does not have the SHA-256 the server announced."""


_BY_CODE: dict[str, type[ApiError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        ValidationError,
        AuthenticationError,
        AuthorizationError,
        NotFound,
        MethodNotAllowed,
        Conflict,
        PayloadTooLarge,
        RateLimited,
        ServiceUnavailable,
        InternalError,
        LicenseExpired,
        LicenseRevoked,
        LicenseLimitReached,
        TenantInactive,
    )
}
_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: AuthorizationError,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationError,
    429: RateLimited,
    500: InternalError,
    503: ServiceUnavailable,
}


def error_from_body(
    status: int, body: Any, request_id: str | None = None, retry_after: float | None = None
) -> ApiError:
    """The exception for an error answer: by `error.code`, else by status."""
    code, message, details = "", "", None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            code = str(err.get("code") or "")
            message = str(err.get("message") or "")
            details = err.get("details") if isinstance(err.get("details"), list) else None
            request_id = err.get("request_id") or request_id
        message = message or str(body.get("message") or "")
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or ApiError
    message = message or f"HTTP {status}"
    return cls(status, code or cls.code, message, details, request_id, retry_after)
