"""Per-sender rate limiting: a token bucket per key, refilled continuously."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


class RateLimiter:
    """Allows ``per_minute`` events per key on average, in bursts of up to ``per_minute``."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, last time)

    def retry_after(self, key: Hashable) -> float:
        """Take one event for ``key``: 0 if allowed now, else the seconds until one would be."""
        now = self.clock()
        tokens, last = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate
