"""Rate limit per API key: a token bucket per key, held in this API process.

Each key may burst `TUNEFORGE_RATE_LIMIT_PER_MINUTE` requests, and its bucket refills continuously at
that many per minute; a request that finds the bucket empty gets a 429 whose `Retry-After` is the whole
number of seconds until a token is back (the openai SDK sleeps exactly that long before retrying).

The buckets live in memory, so with several API replicas each enforces the limit on its own share of the
traffic: a key may make up to replicas x limit requests a minute in all. That is acceptable for what the
limit is for (stopping a runaway script or retry loop from starving everyone else's requests to one
process and the database), not for billing-grade quotas; set the limit to total / replicas, or move the
buckets to Redis (one INCR with an expiry per key and window) when an exact global limit matters.
"""

import hashlib
import math
import threading
import time
from collections.abc import Callable
from functools import lru_cache

from app.config import get_settings
from app.errors import ApiError


class RateLimiter:
    """Token buckets of `per_minute` tokens, one per key, refilled at `per_minute / 60` a second."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when counted)
        self._lock = threading.Lock()  # sync routes and dependencies run in a thread pool

    def acquire(self, key: str) -> int:
        """Take one token from `key`'s bucket: 0 when the request may go, else whole seconds to wait."""
        if self.per_minute <= 0:
            return 0
        rate = self.per_minute / 60
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.get(key, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - then) * rate)
            if tokens >= 1 - 1e-9:  # a client that waited exactly Retry-After must not lose to rounding
                self._buckets[key] = (tokens - 1, now)
                return 0
            self._buckets[key] = (tokens, now)
        return max(1, math.ceil((1 - tokens) / rate - 1e-9))


@lru_cache
def get_limiter() -> RateLimiter:
    """The process-wide limiter, sized from the settings."""
    return RateLimiter(get_settings().rate_limit_per_minute)


def enforce(token: str) -> None:
    """Count one request by the API key `token`; 429 with `Retry-After` once its bucket is empty."""
    limiter = get_limiter()
    # The key's sha256 is what the api_keys table stores: one bucket per key, no plaintext kept.
    wait = limiter.acquire(hashlib.sha256(token.encode()).hexdigest())
    if wait:
        raise ApiError(
            429,
            f"Rate limit reached: this API key may make {limiter.per_minute} requests per minute. "
            f"Try again in {wait} s.",
            type="requests",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(wait)},
        )
