"""HTTP calls to the broker: one request, its answer decoded or its error raised; back-off."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import msgspec

from fleet_broker_client.errors import ApiError, TransportError, error_from_body

T = TypeVar("T")
_json = msgspec.json.Encoder()


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off with jitter and a cap: attempt n waits up to
    min(cap, initial * factor**n), less a random fraction (`jitter`) of it."""

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.5
    attempts: int = 10  # retries of one HTTP call before its error is raised

    def delay(self, attempt: int) -> float:
        d = min(self.cap, self.initial * self.factor ** min(attempt, 64))
        return d * (1.0 - self.jitter * random.random())


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Transport:
    """The HTTP session and the base URL; `request` raises `ApiError`s and `TransportError`."""

    def __init__(
        self, base_url: str, session: aiohttp.ClientSession | None = None, timeout: float = 30.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._own = session is None
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str) -> str:
        return self.base_url + path

    async def request(
        self,
        method: str,
        path: str,
        type_: type[T],
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
    ) -> T:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = None
        if json is not None:
            data = _json.encode(json)
            hdrs["Content-Type"] = "application/json"
        query = {k: _param(v) for k, v in (params or {}).items() if v is not None}
        try:
            async with self.session.request(
                method, self.url(path), data=data, params=query, headers=hdrs, timeout=self.timeout
            ) as resp:
                body = await resp.read()
                status = resp.status
                rheaders = resp.headers
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(f"{method} {path}: {exc!r}") from exc
        if status >= 400:
            try:
                decoded = msgspec.json.decode(body) if body else None
            except msgspec.DecodeError:
                decoded = None
            raise error_from_body(
                status, decoded, rheaders.get("X-Request-ID"), _retry_after(rheaders)
            )
        if type_ is type(None) or not body:
            return None  # type: ignore[return-value]
        try:
            return msgspec.json.decode(body, type=type_)
        except msgspec.DecodeError as exc:
            raise TransportError(f"{method} {path}: unexpected answer: {exc}") from exc


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


async def with_retries(backoff: Backoff, call: Any, *, retry: bool = True) -> Any:
    """Await `call()` again after transport errors, 429 and 502-504, up to `backoff.attempts`."""
    attempt = 0
    while True:
        try:
            return await call()
        except (TransportError, ApiError) as exc:
            retryable = isinstance(exc, TransportError) or exc.retryable
            if not retry or not retryable or attempt >= backoff.attempts:
                raise
            delay = backoff.delay(attempt)
            if isinstance(exc, ApiError) and exc.retry_after is not None:
                delay = max(delay, min(exc.retry_after, backoff.cap))
            attempt += 1
            await asyncio.sleep(delay)
