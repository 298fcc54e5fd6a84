"""API keys for automation: creation, listing, revocation, and authentication by key.

A key reads `bk_<id>_<secret>`: the id names its record (`apk_<id>`, its stream), the secret is
256 random bits. The log keeps only the SHA-256 of the whole key (a slow hash buys nothing for a
secret that cannot be guessed), so the key is shown once, when created.

A key authenticates as its owner (`Authorization: Bearer <key>` or `X-API-Key: <key>`), with the
permissions that are both among its scopes and held by the owner at that moment: a role taken
from the owner is taken from their keys too, and a deactivated owner's keys stop working. Every
use is checked against the projection, so a revocation takes effect at once, on every instance
that has applied it. Uses are recorded (`apikey.used`) at most once a minute per key and instance.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Literal

import structlog

from broker.errors import (
    AuthenticationFailed,
    BrokerError,
    Forbidden,
    NotFound,
    ValidationFailed,
)
from broker.principal import Authenticator, Principal
from broker.runtime import Reaction, Runtime
from broker.services.eventlog import Feeds
from eventstore.base import Envelope, StoreError
from eventstore.events import (
    ApiKeyCreated,
    ApiKeyRevoked,
    ApiKeyUsed,
    RoleDeleted,
    RoleUpdated,
    TokenFamilyRevoked,
    UserDeactivated,
    UserRoleRevoked,
)
from projections.apikeys import ApiKey
from projections.users import UsersProjection

log = structlog.get_logger(__name__)

PREFIX = "bk_"
ID_PREFIX = "apk_"
USE_RECORD_INTERVAL = 60.0  # seconds between two `apikey.used` events of one key
MIN_TTL, MAX_TTL = 60, 10 * 365 * 86400
ADMIN = "users:admin"
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="broker", error="invalid_token"'}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_key(token: str) -> bool:
    return token.startswith(PREFIX)


def new_key() -> tuple[str, str]:
    """(key id, the key itself)."""
    ident = secrets.token_hex(12)
    return ID_PREFIX + ident, f"{PREFIX}{ident}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    body = key.removeprefix(PREFIX)
    ident, sep, secret = body.partition("_")
    if not sep or not secret or len(ident) != 24:
        return None
    return ID_PREFIX + ident


# --- managing keys ---


class ApiKeys:
    """Operators' API keys: created (the secret shown once), listed, revoked."""

    def __init__(self, runtime: Runtime, clock: Callable[[], float] = time.time) -> None:
        self.runtime = runtime
        self.clock = clock

    @property
    def users(self) -> UsersProjection:
        return self.runtime.users

    def _check_scopes(self, owner: Principal, scopes: list[str]) -> list[str]:
        scopes = list(dict.fromkeys(scopes))
        if not scopes:
            raise ValidationFailed("a key needs at least one scope", details=[{"field": "scopes"}])
        unknown = [s for s in scopes if s not in self.runtime.users.permissions]
        if unknown:
            raise ValidationFailed(
                f"unknown scope(s): {', '.join(unknown)} (scopes are permission names)",
                details=[{"field": "scopes"}],
            )
        beyond = [s for s in scopes if not owner.can(s)]
        if beyond:
            raise Forbidden(f"you do not hold the permission(s) {', '.join(beyond)}")
        return scopes

    async def create(
        self,
        owner: Principal,
        *,
        name: str,
        scopes: list[str],
        expires_in: int | None,
    ) -> tuple[ApiKey, str]:
        """A new key of `owner` (the caller) and its secret, recorded before it is returned."""
        if owner.is_node:
            raise Forbidden("only operators own API keys")
        if not name.strip():
            raise ValidationFailed("name must not be blank", details=[{"field": "name"}])
        scopes = self._check_scopes(owner, scopes)
        if expires_in is not None and not MIN_TTL <= expires_in <= MAX_TTL:
            raise ValidationFailed(
                f"expires_in must be between {MIN_TTL} and {MAX_TTL} seconds (null: never)",
                details=[{"field": "expires_in"}],
            )
        key_id, secret = new_key()
        event = ApiKeyCreated(
            key_id=key_id,
            name=name.strip(),
            owner_id=owner.id,
            scopes=scopes,
            key_hash=hash_key(secret),
            expires_at=None if expires_in is None else self.clock() + expires_in,
        )
        await self.runtime.record([event], expected_version=0)
        key = self.runtime.apikeys.get(key_id)
        assert key is not None  # recorded events are applied before record() returns
        return key, secret

    def visible(self, principal: Principal) -> list[ApiKey]:
        """Every key for an operator holding users:admin; the caller's own otherwise."""
        if principal.can(ADMIN):
            return list(self.runtime.apikeys.keys.values())
        return self.runtime.apikeys.owned_by(principal.id)

    def get(self, principal: Principal, key_id: str) -> ApiKey:
        key = self.runtime.apikeys.get(key_id)
        if key is None or (key.owner_id != principal.id and not principal.can(ADMIN)):
            raise NotFound(f"API key not found: {key_id}")
        return key

    async def revoke(self, principal: Principal, key_id: str) -> ApiKey:
        """Revoke a key (idempotent): it stops working at once, sessions opened with it too."""
        key = self.get(principal, key_id)
        if key.revoked_at is None:
            await self.runtime.record(
                [ApiKeyRevoked(key_id=key.id, by=principal.id, reason="revoked")]
            )
        return self.get(principal, key_id)


def status(key: ApiKey, now: float) -> Literal["active", "revoked", "expired"]:
    if key.revoked_at is not None:
        return "revoked"
    return "active" if key.live(now) else "expired"


# --- authenticating with a key ---


class KeyAuthenticator:
    """Turns a key into the principal it acts as, or raises AuthenticationFailed."""

    def __init__(
        self, runtime: Callable[[], Runtime], clock: Callable[[], float] = time.time
    ) -> None:
        self._runtime = runtime
        self.clock = clock
        self._recording: set[str] = set()
        self._tried: dict[str, float] = {}  # key id -> when this instance last tried to record

    def check(self, key: str) -> tuple[ApiKey, Principal]:
        """The key's record and principal, without recording the use."""
        runtime, now = self._runtime(), self.clock()
        key_id = key_id_of(key)
        record = runtime.apikeys.get(key_id) if key_id else None
        if record is None or not hmac.compare_digest(hash_key(key), record.key_hash):
            raise AuthenticationFailed("invalid API key", headers=_CHALLENGE)
        if record.revoked_at is not None:
            raise AuthenticationFailed("API key revoked", headers=_CHALLENGE)
        if not record.live(now):
            raise AuthenticationFailed("API key expired", headers=_CHALLENGE)
        user = runtime.users.get(record.owner_id)
        if user is None or not user.is_active:
            raise AuthenticationFailed("the key's owner is not active", headers=_CHALLENGE)
        perms = frozenset(record.scopes) & frozenset(runtime.users.permissions_of(user))
        principal = Principal(
            "user",
            user.id,
            user.username,
            perms,
            token_id=record.id,
            expires_at=record.expires_at or 0.0,
            api_key=record.id,
        )
        return record, principal

    async def authenticate(self, key: str) -> Principal:
        record, principal = self.check(key)
        await self.note_use(record)
        return principal

    async def note_use(self, record: ApiKey) -> None:
        """Record a use of the key unless one was recorded within the last minute. A log that
        cannot take it (full disk, read-only) does not refuse the request: it is a read."""
        now = self.clock()
        last = max(record.last_used_at or 0.0, self._tried.get(record.id, 0.0))
        if now - last < USE_RECORD_INTERVAL or record.id in self._recording:
            return
        if len(self._tried) > 10_000:  # keys used once long ago: forget them
            self._tried = {k: t for k, t in self._tried.items() if now - t < USE_RECORD_INTERVAL}
        self._tried[record.id] = now  # a failed attempt is not retried at once either
        self._recording.add(record.id)
        try:
            await self._runtime().record([ApiKeyUsed(key_id=record.id)])
        except (StoreError, BrokerError) as exc:
            log.warning("api_key_use_not_recorded", key_id=record.id, error=str(exc))
        finally:
            self._recording.discard(record.id)


# Events after which an open feed's credential may no longer be valid.
REVOKING = (
    ApiKeyRevoked,
    TokenFamilyRevoked,
    UserDeactivated,
    UserRoleRevoked,
    RoleUpdated,
    RoleDeleted,
)


def on_revocations(feeds: Feeds) -> Reaction:
    """A runtime reaction: open feeds (operator WebSockets, SSE) check their credential again as
    soon as one may have been revoked, on this instance or, on a shared log, any other."""

    def on_append(envs: Sequence[Envelope]) -> None:
        if any(isinstance(env.event, REVOKING) for env in envs):
            feeds.credentials_changed()

    return on_append


def with_api_keys(keys: KeyAuthenticator, tokens: Authenticator) -> Authenticator:
    """Accept API keys wherever a bearer token is accepted."""

    async def authenticate(token: str) -> Principal:
        if is_key(token):
            return await keys.authenticate(token)
        return await tokens(token)

    return authenticate
