"""Prometheus metrics of one app (its own registry: several apps in one process never clash).

Requests by route template, method and status, with latencies; engine queue depth (waiting and
running requests), KV blocks in use, generated tokens (tokens/s is `rate()` of the counter),
user-token cache hits and misses (hit rate = hits / (hits + misses)) and refresh latency, and
the recommendations' latest-state cache hits and misses."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _EngineCollector:
    def __init__(self, stats: Callable[[], dict | None]):
        self.stats = stats

    def describe(self):  # noqa: ANN201 - no fixed descriptions: the engine may be absent
        return []

    def collect(self):  # noqa: ANN201
        s = self.stats()
        if not s:
            return
        yield GaugeMetricFamily("userllm_engine_queue_depth", "requests waiting or running",
                                value=s["waiting"] + s["running"])
        yield GaugeMetricFamily("userllm_engine_kv_blocks_in_use", "paged KV blocks in use",
                                value=s["num_blocks"] - s["free_blocks"])
        yield GaugeMetricFamily("userllm_engine_kv_blocks_total", "paged KV blocks",
                                value=s["num_blocks"])


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("userllm_http_requests", "HTTP requests",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("userllm_http_request_seconds", "HTTP request latency",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("userllm_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("userllm_time_to_first_token_seconds", "time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.cache = Counter("userllm_user_token_cache", "user-token cache lookups",
                             ["result"], registry=r)
        self.refresh = Histogram("userllm_user_tokens_refresh_seconds",
                                 "user-token computation (cache misses)",
                                 buckets=LATENCY_BUCKETS, registry=r)

        self.rank_cache = Counter("userllm_rank_state_cache",
                                  "recommendations: sealed latest-state cache lookups",
                                  ["result"], registry=r)

    def observe_cache(self, cache: str, hit: bool, seconds: float) -> None:
        """One sealed-cache lookup: "user_tokens" (chat) or "rank_state" (recommendations)."""
        if cache == "user_tokens":
            self.cache.labels("hit" if hit else "miss").inc()
            if not hit:
                self.refresh.observe(seconds)
        else:
            self.rank_cache.labels("hit" if hit else "miss").inc()

    def watch_engine(self, stats: Callable[[], dict | None]) -> None:
        self.registry.register(_EngineCollector(stats))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
