"""One error catalog (STYLE.md 11): every error the API reports is a BrokerError with a code.

`docs/errors.md` lists the codes; `broker.http.middleware` turns them into the error body of
DESIGN.md §6.
"""

from __future__ import annotations

from typing import Any


class BrokerError(Exception):
    code = "INTERNAL"
    status = 500

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
    code, status = "CONFLICT", 409


class PayloadTooLarge(BrokerError):
    code, status = "PAYLOAD_TOO_LARGE", 413


class RateLimited(BrokerError):
    code, status = "RATE_LIMIT", 429


class Unavailable(BrokerError):
    code, status = "SERVICE_UNAVAILABLE", 503


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


# Every code above, for docs and tests.
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
