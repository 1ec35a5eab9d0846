"""Rate limiting with the `limits` library: moving windows per API key (by its hash) and per
client address (so made-up keys buy no extra requests), counted in Redis when `redis_url` is
set, so every worker and node shares them, and in process memory otherwise. The async storages:
a Redis round trip never blocks the event loop."""

from __future__ import annotations

import time

from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string


class RateLimiter:
    def __init__(self, per_key: str, per_address: str, redis_url: str | None, namespace: str):
        self.per_key = parse(per_key) if per_key else None
        self.per_address = parse(per_address) if per_address else None
        if redis_url:
            uri = "async+" + redis_url if not redis_url.startswith("async+") else redis_url
            self.storage = storage_from_string(uri, implementation="redispy")
        else:
            self.storage = storage_from_string("async+memory://")
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.namespace = namespace

    async def hit(self, key: str | None, address: str) -> float | None:
        """None when allowed, else the seconds until the next request may pass. Each request
        counts against its address, and against its key when it names one."""
        for item, who in ((self.per_address, "a:" + address), (self.per_key, key and "k:" + key)):
            if item is None or who is None:
                continue
            if not await self.limiter.hit(item, self.namespace, who):
                reset, _ = await self.limiter.get_window_stats(item, self.namespace, who)
                return max(1.0, reset - time.time())
        return None

    async def check_storage(self) -> bool:
        return bool(await self.storage.check())
