"""Rate limiting with the `limits` library: a moving window per identity (a hash of the API key,
or the client address without one), counted in Redis when `redis_url` is set, so every worker
and node shares it, and in process memory otherwise."""

from __future__ import annotations

import time

from limits import parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter


class RateLimiter:
    def __init__(self, rule: str, redis_url: str | None, namespace: str):
        self.item = parse(rule)
        uri = redis_url or "memory://"
        self.storage = storage_from_string(uri)
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.namespace = namespace

    def hit(self, identity: str) -> float | None:
        """None when allowed, else the seconds until the next request may pass."""
        if self.limiter.hit(self.item, self.namespace, identity):
            return None
        reset, _ = self.limiter.get_window_stats(self.item, self.namespace, identity)
        return max(1.0, reset - time.time())

    def check_storage(self) -> bool:
        return bool(self.storage.check())
