"""Rate limiting with the `limits` library: moving windows per API key (by its hash) and per
client address (so made-up keys buy no extra requests), counted in Redis when `redis_url` is
set, so every worker and node shares them, and in process memory otherwise."""

from __future__ import annotations

import time

from limits import parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter


class RateLimiter:
    def __init__(self, per_key: str, per_address: str, redis_url: str | None, namespace: str):
        self.per_key = parse(per_key) if per_key else None
        self.per_address = parse(per_address) if per_address else None
        self.storage = storage_from_string(redis_url or "memory://")
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.namespace = namespace

    def hit(self, key: str | None, address: str) -> float | None:
        """None when allowed, else the seconds until the next request may pass. Each request
        counts against its address, and against its key when it names one."""
        for item, who in ((self.per_address, "a:" + address), (self.per_key, key and "k:" + key)):
            if item is None or who is None:
                continue
            if not self.limiter.hit(item, self.namespace, who):
                reset, _ = self.limiter.get_window_stats(item, self.namespace, who)
                return max(1.0, reset - time.time())
        return None

    def check_storage(self) -> bool:
        return bool(self.storage.check())
