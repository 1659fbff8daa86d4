"""Prometheus metrics of a server: requests, latency, generated tokens, tokens/s, batch sizes, queue depth.

Each app has its own registry (two servers in one process do not share counters); an ASGI
middleware counts every HTTP request by route and status without touching response bodies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["MetricsMiddleware", "ServingMetrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServingMetrics:
    """The metrics one server exports at ``/metrics``."""

    def __init__(self, *, queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "unitedllm_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "unitedllm_request_latency_seconds",
            "Time from request to the end of its response",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter("unitedllm_generated_tokens", "Tokens generated", registry=self.registry)
        self.tokens_per_second = Gauge(
            "unitedllm_tokens_per_second",
            "Generated tokens per second over the last batch",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "unitedllm_batch_size",
            "Requests decoded together",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "unitedllm_queue_depth", "Requests waiting for the model", registry=self.registry
        )
        self.queue_depth.set_function(lambda: float(queue_depth()))
        self.global_round = Gauge(
            "unitedllm_global_round", "Round of the adapter 'global' names (-1: none)", registry=self.registry
        )
        self.global_round.set(-1)
        self.cancelled = Counter(
            "unitedllm_cancelled_requests",
            "Generations stopped early because their client disconnected",
            registry=self.registry,
        )
        self.refused = Counter(
            "unitedllm_adapters_refused", "Adapters that failed their checks", registry=self.registry
        )

    def observe_batch(self, rows: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.tokens.inc(tokens)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware: counts each HTTP request once its response ends (streams included)."""

    def __init__(self, app: Any, *, metrics: ServingMetrics, routes: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            route = path if path in self.routes else "other"
            self.metrics.observe_request(route, status, time.perf_counter() - started)
