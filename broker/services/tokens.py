"""Tokens: Ed25519-signed JWTs for nodes and operators, refresh-token families, the authenticator.

- One signing key (Ed25519, algorithm pinned to EdDSA), generated on first start and kept as PEM
  under the data directory (`[auth] key_file`); every instance sharing a log must share it. Its
  public half is published as JWKS.
- Claims: `iss`, `aud`, `sub`, `exp`, `iat`, `jti`, `typ` ("access" or "refresh"), all required,
  plus `kind` ("node" or "user"), `fam` (the refresh-token family, i.e. the login) and `gen`
  (for nodes: the seq of the registration the token belongs to).
- A login starts a family; `refresh` rotates it (the log keeps only the hash of the current refresh
  token); a rotated-out token presented again revokes the family (reuse detection). Logout,
  deregistration and deactivation revoke families too.
- `authenticate` (installed as `app[AUTHENTICATOR]`) verifies an access token once and remembers it
  until it expires; every call still checks, against the projections, that the family is not
  revoked, the node is still registered (same generation) and the user still active. Operator
  permissions are resolved from the users projection on every call, so a revoked role takes effect
  at once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import msgspec
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.config import AuthConfig, ConfigError
from broker.errors import AuthenticationFailed, Unavailable
from broker.principal import Principal
from broker.runtime import Runtime
from eventstore.base import ConcurrencyError
from eventstore.events import BaseEvent, TokenFamilyRevoked, TokenFamilyStarted, TokenRotated

ALGORITHM = "EdDSA"
ACCESS, REFRESH = "access", "refresh"
REQUIRED_CLAIMS = ["iss", "aud", "sub", "exp", "iat", "jti", "typ"]
KINDS = ("node", "user")
# An access token whose family this instance has not seen yet is accepted this long after its
# `iat`: another instance sharing the log may have issued it a moment ago (DESIGN.md §8).
UNSEEN_FAMILY_GRACE = 30.0
_CHALLENGE = 'Bearer realm="broker", error="invalid_token"'


class TokenPair(msgspec.Struct):
    """What a login or a refresh returns (the seed clients read these four fields)."""

    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in: int = 900


@dataclass(slots=True)
class Session:
    """A new login: its family id, its tokens and the events that record it."""

    family_id: str
    tokens: TokenPair
    events: list[BaseEvent]


class _Verified:
    """An access token whose signature and claims have been checked once."""

    __slots__ = ("principal", "kind", "sub", "fam", "gen", "iat", "exp", "key")

    def __init__(self, principal: Principal, claims: dict[str, Any]) -> None:
        self.principal = principal
        self.kind: str = claims["kind"]
        self.sub: str = claims["sub"]
        self.fam: str = claims["fam"]
        self.gen: int = claims.get("gen", 0)
        self.iat: float = claims["iat"]
        self.exp: float = claims["exp"]
        self.key: str = claims.get("key", "")  # a session opened with an API key (login-key)


def hash_token(token: str) -> str:
    """The stored form of a refresh token (they carry >= 128 random bits: a plain hash suffices)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """Read the signing key at `path`, creating it (mode 0600) if absent. Blocking: run in a
    thread. Two instances starting at once on a shared directory end up with the same key."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic and refuses to replace: the first instance wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


class TokenService:
    """Issues and verifies tokens; one per application."""

    def __init__(self, config: AuthConfig, data_dir: str) -> None:
        self.config = config
        self.key_path = (
            Path(config.key_file) if config.key_file else Path(data_dir) / "jwt_ed25519.pem"
        )
        self._private: Ed25519PrivateKey | None = None
        self._public: Any = None
        self.kid = ""
        self._runtime: Runtime | None = None
        self._cache: dict[str, _Verified] = {}
        self._jwt = jwt.PyJWT()
        self.clock: Callable[[], float] = time.time  # tests move it
        self._options: Any = {"require": REQUIRED_CLAIMS}

    # --- life cycle ---

    def use_key(self, key: Ed25519PrivateKey) -> None:
        self._private = key
        self._public = key.public_key()
        raw = self._public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        thumbprint = f'{{"crv":"Ed25519","kty":"OKP","x":"{_b64url(raw)}"}}'  # RFC 7638
        self.kid = _b64url(hashlib.sha256(thumbprint.encode()).digest())
        self._jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}

    async def start(self, runtime: Runtime) -> None:
        """Load (or create) the signing key and serve tokens from `runtime`'s projections."""
        if self._private is None:
            try:
                key = await asyncio.to_thread(load_or_create_key, self.key_path)
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not an Ed25519 key in PEM"
                raise ConfigError(
                    f"cannot use the token signing key {self.key_path} ([auth] key_file): {reason}"
                ) from None
            self.use_key(key)
        self._runtime = runtime

    def stop(self) -> None:
        self._runtime = None
        self._cache.clear()

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise Unavailable("the token service is not started")
        return self._runtime

    def jwks(self) -> dict[str, Any]:
        """The public signing key as a JSON Web Key Set."""
        return {"keys": [{**self._jwk, "kid": self.kid, "alg": ALGORITHM, "use": "sig"}]}

    def derive_secret(self, label: bytes) -> bytes:
        """A 32-byte secret derived from the signing key (shared by instances sharing the key)."""
        if self._private is None:
            raise Unavailable("the token service is not started")
        raw = self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(raw)

    # --- issuing ---

    def _mint(
        self, kind: str, subject: str, gen: int, family_id: str, now: float, key: str = ""
    ) -> tuple[TokenPair, str, float]:
        iat = int(now)
        access_ttl = int(self.config.access_ttl)
        refresh_exp = iat + int(self.config.refresh_ttl)
        common = {
            "iss": self.config.issuer,
            "aud": self.config.audience,
            "sub": subject,
            "iat": iat,
            "kind": kind,
            "fam": family_id,
            "gen": gen,
        }
        if key:  # the session acts with the API key's scopes, and ends with the key
            common["key"] = key
        headers = {"kid": self.kid}
        access = jwt.encode(
            {**common, "exp": iat + access_ttl, "jti": secrets.token_urlsafe(16), "typ": ACCESS},
            self._private,  # type: ignore[arg-type]
            algorithm=ALGORITHM,
            headers=headers,
        )
        refresh = jwt.encode(
            {**common, "exp": refresh_exp, "jti": secrets.token_urlsafe(16), "typ": REFRESH},
            self._private,  # type: ignore[arg-type]
            algorithm=ALGORITHM,
            headers=headers,
        )
        return TokenPair(access, refresh, "bearer", access_ttl), hash_token(refresh), refresh_exp

    def open_session(self, kind: str, subject: str, gen: int, now: float, key: str = "") -> Session:
        """Tokens for a new login and the events recording it (the caller records them, with
        expected version 0 on `family_id`, together with its own login events). Past
        `max_sessions` live logins, the subject's oldest are revoked in the same append."""
        family_id = "rtf:" + secrets.token_hex(16)
        pair, token_hash, expires_at = self._mint(kind, subject, gen, family_id, now, key)
        events: list[BaseEvent] = [
            TokenFamilyStarted(
                family_id=family_id,
                subject_kind=kind,
                subject_id=subject,
                token_hash=token_hash,
                expires_at=expires_at,
            )
        ]
        live = self.runtime.tokens.live_families(kind, subject, now)
        excess = len(live) + 1 - self.config.max_sessions
        for fam in live[: max(0, excess)]:
            events.append(TokenFamilyRevoked(family_id=fam.family_id, reason="superseded"))
        return Session(family_id, pair, events)

    # --- verifying ---

    def _decode(self, token: str, typ: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = self._jwt.decode(
                token,
                self._public,
                algorithms=[ALGORITHM],
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationFailed("token expired", headers=_www()) from None
        except (jwt.InvalidTokenError, ValueError, TypeError):
            raise AuthenticationFailed("invalid token", headers=_www()) from None
        if claims["typ"] != typ:
            raise AuthenticationFailed(
                f"not {'an' if typ == ACCESS else 'a'} {typ} token", headers=_www()
            )
        if (
            claims.get("kind") not in KINDS
            or not isinstance(claims.get("fam"), str)
            or not isinstance(claims.get("gen", 0), int)
            or not isinstance(claims["sub"], str)
            or not isinstance(claims.get("key", ""), str)
        ):
            raise AuthenticationFailed("invalid token", headers=_www())
        return claims

    async def authenticate(self, token: str) -> Principal:
        """`app[AUTHENTICATOR]`: the principal of a valid, live access token, else 401."""
        return self.verify_access(token, self.clock())

    def verify_access(self, token: str, now: float) -> Principal:
        """Synchronous core of `authenticate` (also what the benchmark measures)."""
        entry = self._cache.get(token)
        if entry is None:
            claims = self._decode(token, ACCESS)
            kind = claims["kind"]
            sub, jti, exp = claims["sub"], claims["jti"], claims["exp"]
            key = claims.get("key", "")
            principal = Principal(kind, sub, sub, frozenset(), jti, exp, claims["fam"], key)
            entry = _Verified(principal, claims)
            self._remember(token, entry, now)
        elif now > entry.exp + self.config.leeway:
            del self._cache[token]
            raise AuthenticationFailed("token expired", headers=_www())
        return self._live_principal(entry, now)

    def _remember(self, token: str, entry: _Verified, now: float) -> None:
        cache = self._cache
        if len(cache) >= self.config.token_cache_size:
            horizon = now - self.config.leeway
            for t in [t for t, e in cache.items() if e.exp < horizon]:
                del cache[t]
            if len(cache) >= self.config.token_cache_size:  # all live: drop the oldest tenth
                for t in list(cache)[: max(1, len(cache) // 10)]:
                    del cache[t]
        cache[token] = entry

    def _live_principal(self, entry: _Verified, now: float) -> Principal:
        rt = self.runtime
        fam = rt.tokens.families.get(entry.fam)
        if fam is None:
            if now - entry.iat > UNSEEN_FAMILY_GRACE:
                raise AuthenticationFailed("token revoked", headers=_www())
        elif fam.revoked_at is not None:
            raise AuthenticationFailed("token revoked", headers=_www())
        if entry.kind == "node":
            node = rt.nodes.get(entry.sub)
            if node is None or node.generation != entry.gen:
                raise AuthenticationFailed("node is not registered", headers=_www())
            return entry.principal
        user = rt.users.users.get(entry.sub)
        if user is None or not user.is_active:
            raise AuthenticationFailed("user is not active", headers=_www())
        perms = frozenset(rt.users.permissions_of(user))
        if entry.key:
            perms &= self._key_scopes(entry.key, now)
        p = entry.principal
        if p.permissions != perms or p.name != user.username:
            p = entry.principal = Principal(
                "user", user.id, user.username, perms, p.token_id, entry.exp, p.session, p.api_key
            )
        return p

    def _key_scopes(self, key_id: str, now: float) -> frozenset[str]:
        """The scopes of the live API key a session was opened with; 401 once it is not."""
        key = self.runtime.apikeys.get(key_id)
        if key is None or not key.live(now):
            raise AuthenticationFailed("the API key of this session is revoked", headers=_www())
        return frozenset(key.scopes)

    def family_of(self, token: str) -> str:
        """The family (login) of a valid access token."""
        self.verify_access(token, self.clock())
        return self._cache[token].fam

    def _check_subject(self, kind: str, subject: str, gen: int) -> None:
        rt = self.runtime
        if kind == "node":
            node = rt.nodes.get(subject)
            if node is None or node.generation != gen:
                raise AuthenticationFailed("node is not registered", headers=_www())
        else:
            user = rt.users.get(subject)
            if user is None or not user.is_active:
                raise AuthenticationFailed("user is not active", headers=_www())

    async def refresh(self, token: str, kind: str | None = None) -> TokenPair:
        """Rotate a refresh token: a new pair, the old refresh token void. Presenting a
        rotated-out token again revokes its whole family. `kind` restricts the subject kind."""
        claims = self._decode(token, REFRESH)
        if kind is not None and claims["kind"] != kind:
            raise AuthenticationFailed(f"not a {kind} token", headers=_www())
        rt = self.runtime
        fam = rt.tokens.get(claims["fam"])
        if fam is None or fam.revoked_at is not None:
            raise AuthenticationFailed("refresh token revoked", headers=_www())
        gen = claims.get("gen", 0)
        self._check_subject(claims["kind"], claims["sub"], gen)
        key = claims.get("key", "")
        if key:
            self._key_scopes(key, self.clock())
        if not hmac.compare_digest(hash_token(token), fam.token_hash):
            await self.revoke(fam.family_id, "reuse")
            raise AuthenticationFailed(
                "refresh token already used: the session is revoked", headers=_www()
            )
        now = self.clock()
        pair, token_hash, expires_at = self._mint(
            claims["kind"], claims["sub"], gen, fam.family_id, now, key
        )
        rotated = TokenRotated(
            family_id=fam.family_id, token_hash=token_hash, expires_at=expires_at
        )
        try:
            await rt.record([rotated], expected_version=fam.version)
        except ConcurrencyError:
            # The same refresh token was presented twice at once: that is reuse too.
            await self.revoke(fam.family_id, "reuse")
            raise AuthenticationFailed(
                "refresh token already used: the session is revoked", headers=_www()
            ) from None
        return pair

    async def revoke(self, family_id: str, reason: str) -> None:
        """Revoke one family (logout, reuse): its refresh and access tokens stop working."""
        fam = self.runtime.tokens.get(family_id)
        if fam is not None and fam.revoked_at is None:
            await self.runtime.record([TokenFamilyRevoked(family_id=family_id, reason=reason)])


def _www() -> dict[str, str]:
    return {"WWW-Authenticate": _CHALLENGE}
