"""The node's credentials: its RSA key, its login and its tokens.

Invariants:
- a refresh token is presented at most once: it is forgotten before the refresh request goes
  out; if the answer is lost, the node logs in afresh (signing a challenge) instead;
- a refused refresh means the login was revoked: `SessionRevoked`, sticky until `login()`;
- with a session file, processes sharing it (the CLI's `listen` and `send`) renew under an
  exclusive file lock and adopt a token another process rotated in the meantime.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from fleet_broker_client.errors import AuthenticationError, SessionRevoked
from fleet_broker_client.models import Challenge, Tokens
from fleet_broker_client.transport import Backoff, Transport, with_retries


def load_or_create_key(path: str | os.PathLike[str], bits: int = 2048) -> rsa.RSAPrivateKey:
    """The RSA key in `path` (PEM, PKCS#8), created with mode 0600 if the file is missing."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return load_or_create_key(p, bits)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        return key
    loaded = serialization.load_pem_private_key(data, password=None)
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise ValueError(f"{p}: not an RSA private key")
    return loaded


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def sign_challenge(key: rsa.RSAPrivateKey, challenge: str) -> str:
    """RSA-PSS (MGF1-SHA-256, maximum salt), SHA-256, over the challenge text; hex."""
    return key.sign(
        challenge.encode("utf-8"),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
        hashes.SHA256(),
    ).hex()


def token_claims(token: str) -> dict[str, Any]:
    """A JWT's claims, unverified (the SDK only reads `exp` and `iat` to plan renewals)."""
    try:
        payload = token.split(".")[1]
        claims = msgspec.json.decode(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return claims if isinstance(claims, dict) else {}
    except (IndexError, ValueError, msgspec.DecodeError):
        return {}


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, mode 0600."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class SavedSession(msgspec.Struct, kw_only=True):
    node_id: str
    access_token: str
    refresh_token: str
    received_at: float  # wall-clock time the pair was issued to this machine
    expires_in: float


class SessionFile:
    """Tokens kept on disk (mode 0600) so that several processes share one login."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def load(self) -> SavedSession | None:
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=SavedSession)
        except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    def save(self, saved: SavedSession) -> None:
        write_private(self.path, msgspec.json.encode(saved))

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


class Auth:
    """Logs the node in and keeps a valid access token."""

    def __init__(
        self,
        node_id: str,
        key: Callable[[], rsa.RSAPrivateKey],
        transport: Transport,
        backoff: Backoff,
        *,
        refresh_ahead: float | None = 0.75,
        session_file: SessionFile | None = None,
        on_tokens: Callable[[Tokens], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self._key = key
        self._http = transport
        self._backoff = backoff
        self.refresh_ahead = refresh_ahead
        self._file = session_file
        self._on_tokens = on_tokens
        self._lock = asyncio.Lock()
        self.tokens: Tokens | None = None
        self._received_at = 0.0
        self.revoked: SessionRevoked | None = None
        self.logins = 0
        self.refreshes = 0

    # --- the token callers use ---

    async def access_token(self) -> str:
        """A live access token: logs in, or refreshes ahead of expiry, as needed."""
        if self.revoked is not None:
            raise self.revoked
        async with self._lock:
            if self.revoked is not None:
                raise self.revoked
            if self.tokens is None and self._file is not None:
                self._adopt(self._file.load())
            if self.tokens is None or not self.tokens.refresh_token and self._expired():
                await self._login()
            elif self._due():
                await self._renew()
            assert self.tokens is not None
            return self.tokens.access_token

    async def renew(self, stale_access: str | None) -> None:
        """The server refused `stale_access` (401): renew it once, unless already done."""
        async with self._lock:
            if self.revoked is not None:
                raise self.revoked
            if self.tokens is not None and self.tokens.access_token != stale_access:
                return
            await self._renew()

    def revoke(self, reason: str) -> SessionRevoked:
        self.revoked = SessionRevoked(reason)
        return self.revoked

    async def login(self) -> Tokens:
        """Log in afresh (challenge, signature, verify); clears a revocation."""
        async with self._lock:
            self.revoked = None
            await self._login()
            assert self.tokens is not None
            return self.tokens

    # --- inside the lock ---

    def _lifetime(self) -> float:
        assert self.tokens is not None
        claims = token_claims(self.tokens.access_token)
        if isinstance(claims.get("exp"), int) and isinstance(claims.get("iat"), int):
            return float(claims["exp"] - claims["iat"])
        return float(self.tokens.expires_in)

    def _due(self) -> bool:
        if self.refresh_ahead is None:
            return False
        return time.time() >= self._received_at + self.refresh_ahead * self._lifetime()

    def _expired(self) -> bool:
        return time.time() >= self._received_at + self._lifetime()

    def _adopt(self, saved: SavedSession | None) -> bool:
        if saved is None or saved.node_id != self.node_id:
            return False
        self.tokens = Tokens(
            access_token=saved.access_token,
            refresh_token=saved.refresh_token,
            expires_in=saved.expires_in,
        )
        self._received_at = saved.received_at
        return True

    async def _store(self, tokens: Tokens) -> None:
        self.tokens = tokens
        self._received_at = time.time()
        if self._file is not None:
            saved = SavedSession(
                node_id=self.node_id,
                access_token=tokens.access_token,
                refresh_token=tokens.refresh_token,
                received_at=self._received_at,
                expires_in=tokens.expires_in,
            )
            await asyncio.to_thread(self._file.save, saved)
        if self._on_tokens is not None:
            self._on_tokens(tokens)

    async def _renew(self) -> None:
        if self._file is None:
            await self._refresh()
            return
        async with self._file.locked():
            saved = await asyncio.to_thread(self._file.load)
            held = self.tokens.refresh_token if self.tokens else None
            if saved is not None and saved.refresh_token and saved.refresh_token != held:
                # Another process sharing the file rotated (or logged in): take its tokens.
                self._adopt(saved)
                if not self._due() and not self._expired():
                    return
            await self._refresh()

    async def _refresh(self) -> None:
        tokens = self.tokens
        refresh = tokens.refresh_token if tokens is not None else ""
        claims = token_claims(refresh) if refresh else {}
        if not refresh or claims.get("exp", 0) <= time.time():
            await self._login()
            return
        assert tokens is not None
        # Forget it before presenting it: whatever happens, it is never presented again.
        self.tokens = msgspec.structs.replace(tokens, refresh_token="")
        try:
            new = await self._http.request(
                "POST", "/api/v1/auth/refresh", Tokens, token=refresh, json={}
            )
        except AuthenticationError as exc:
            if self._file is not None:
                await asyncio.to_thread(self._file.clear)
            reason = f"the login of node {self.node_id} was revoked: {exc.message}"
            raise self.revoke(reason) from exc
        except Exception:
            # Rotated or not, the answer is lost: a fresh login is the only safe way on.
            await self._login()
            return
        self.refreshes += 1
        await self._store(new)

    async def _login(self) -> None:
        key = self._key()

        async def attempt() -> Tokens:
            ch = await self._http.request(
                "POST", "/api/v1/auth/login", Challenge, json={"node_id": self.node_id}
            )
            signature = sign_challenge(key, ch.challenge)
            return await self._http.request(
                "POST",
                "/api/v1/auth/verify",
                Tokens,
                json={"node_id": self.node_id, "challenge": ch.challenge, "signature": signature},
            )

        tokens = await with_retries(self._backoff, attempt)
        self.logins += 1
        self.revoked = None
        await self._store(tokens)
