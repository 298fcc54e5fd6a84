"""The rate limiter's token buckets (the middleware using them: broker.http.ratelimit).

A bucket of `limit` tokens refills at `limit / window` per second, so a burst of `limit` requests is
allowed, then a steady `limit` per window. Buckets live in this process only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.config import LimitsConfig

if TYPE_CHECKING:
    from broker.http.routing import Call


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    limit: int
    window: float

    @property
    def rate(self) -> float:
        return self.limit / self.window


class Decision:
    """The outcome of charging one request to one bucket."""

    __slots__ = ("limit", "remaining", "reset_after", "retry_after")

    def __init__(self, limit: int, remaining: int, reset_after: float, retry_after: float) -> None:
        self.limit = limit
        self.remaining = remaining
        self.reset_after = reset_after  # seconds until the bucket is full again
        self.retry_after = retry_after  # seconds until one request is allowed; 0 when allowed

    @property
    def allowed(self) -> bool:
        return self.retry_after == 0

    def headers(self, now: float | None = None) -> dict[str, str]:
        """The X-RateLimit-* headers (and Retry-After when refused); `now`: the wall clock's
        epoch seconds that the reset time counts from (the current time by default)."""
        reset = (time.time() if now is None else now) + self.reset_after
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(reset)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


class RateLimiter:
    """Token buckets keyed by (rule, key); `clock` is monotonic seconds (injectable for tests)."""

    def __init__(self, config: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.enabled = config.enabled
        self.clock = clock
        w = config.window
        self.principal = Rule("principal", config.per_principal, w)
        self.ip = Rule("ip", config.per_ip, w)
        self.login_ip = Rule("login_ip", config.login_per_ip, w)
        self.login_subject = Rule("login_subject", config.login_per_subject, w)
        self._buckets: dict[tuple[str, str], list[float]] = {}  # -> [tokens, stamp]

    def hit(self, rule: Rule, key: str) -> Decision:
        """Charge one request to `key`'s bucket of `rule`."""
        now = self.clock()
        bucket = self._buckets.get((rule.name, key))
        if bucket is None:
            if len(self._buckets) >= self.config.max_tracked:
                self._sweep(now)
            bucket = self._buckets[(rule.name, key)] = [float(rule.limit), now]
        rate = rule.rate
        tokens = min(float(rule.limit), bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens >= 1.0:
            tokens -= 1.0
            bucket[0] = tokens
            return Decision(rule.limit, int(tokens), (rule.limit - tokens) / rate, 0.0)
        bucket[0] = tokens
        return Decision(rule.limit, 0, (rule.limit - tokens) / rate, (1.0 - tokens) / rate)

    def _sweep(self, now: float) -> None:
        """Forget full buckets (the same as no bucket); if that is not enough, the oldest half."""
        rules = {r.name: r for r in (self.principal, self.ip, self.login_ip, self.login_subject)}
        full = [
            k
            for k, (tokens, stamp) in self._buckets.items()
            if tokens + (now - stamp) * rules[k[0]].rate >= rules[k[0]].limit
        ]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.config.max_tracked:
            for k in list(self._buckets)[: len(self._buckets) // 2 + 1]:
                del self._buckets[k]

    def client_ip(self, request: Call) -> str:
        if self.config.trust_forwarded_for:
            # The last entry: the address the trusted proxy saw. Earlier ones come from the
            # client (or proxies before it) and can be anything (docs/deployment.md).
            forwarded = request.headers.get("X-Forwarded-For", "")
            last = forwarded.rsplit(",", 1)[-1].strip()
            if last:
                return last
        return request.remote or "unknown"

    def __len__(self) -> int:
        return len(self._buckets)
