"""Password hashing with Argon2id (argon2-cffi), at OWASP's recommended parameters; never stored
in clear.

New hashes are Argon2id in the PHC format (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`): 19 MiB,
2 passes, 1 lane (OWASP Password Storage Cheat Sheet). Hashes made before, scrypt
(`scrypt$n$r$p$salt_hex$hash_hex`), still verify; `needs_rehash` says when a stored hash is not
of today's kind or parameters, and the login that proves the password replaces it. Hashing and
verifying run in a worker thread (they cost tens of milliseconds by design), in constant time.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import secrets

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

TIME_COST, MEMORY_KIB, PARALLELISM = 2, 19 * 1024, 1  # OWASP: m=19 MiB, t=2, p=1
_hasher = PasswordHasher(
    time_cost=TIME_COST,
    memory_cost=MEMORY_KIB,
    parallelism=PARALLELISM,
    hash_len=32,
    salt_len=16,
    type=Type.ID,
)
_SCRYPT_MAXMEM = 64 * 1024 * 1024


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def _verify_scrypt(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_hex, digest_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            password.encode(),
            salt=bytes.fromhex(salt_hex),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(digest_hex) // 2,
            maxmem=_SCRYPT_MAXMEM,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest.hex(), digest_hex)


def verify_password(password: str, stored: str) -> bool:
    if stored.startswith("scrypt$"):
        return _verify_scrypt(password, stored)
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    """True when `stored` is not an Argon2id hash with today's parameters."""
    if not stored.startswith("$argon2id$"):
        return True
    try:
        return _hasher.check_needs_rehash(stored)
    except (InvalidHashError, ValueError):
        return True


@functools.cache
def dummy_hash() -> str:
    """A hash checked when the user does not exist, so a login takes as long either way."""
    return hash_password(secrets.token_urlsafe(16))


async def hash_password_async(password: str) -> str:
    return await asyncio.to_thread(hash_password, password)


async def verify_password_async(password: str, stored: str | None) -> bool:
    ok = await asyncio.to_thread(lambda: verify_password(password, stored or dummy_hash()))
    return ok and stored is not None
