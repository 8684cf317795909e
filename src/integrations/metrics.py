"""Prometheus metrics of the server (``GET /metrics``), one registry per app.

Counters: requests by endpoint and status, rejected requests, prompt / output / drafted /
accepted tokens (accepted also by draft source: request, session, global). Gauges: requests in
flight and the hit rate by source (accepted tokens from that source / output tokens, since start).
Histograms: request latency by endpoint, time to the first token, tokens per verification step.
The figures are summed over all tenants: a server that must hide tenants from each other serves
``/metrics`` only to its operator (like ``/health``, it needs no API key).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agentspec.stats import SpecStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
TOKENS_PER_STEP_BUCKETS = (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 16)


class _SpecTotals(Collector):
    """Token counters and hit rates read from one running :class:`SpecStats` sum."""

    def __init__(self) -> None:
        self.total = SpecStats()
        self.lock = threading.Lock()

    def add(self, stats: SpecStats) -> None:
        with self.lock:
            self.total.add(stats)

    def collect(self) -> Iterator[Any]:
        with self.lock:
            t = SpecStats().add(self.total)
        for name, value, doc in [("prompt", t.prompt_tokens, "Prompt tokens of finished generations."),
                                 ("prefill", t.prefill_tokens, "Prompt tokens computed (not from the prefix cache)."),
                                 ("output", t.output_tokens, "Generated tokens."),
                                 ("drafted", t.drafted_tokens, "Draft tokens verified."),
                                 ("accepted", t.accepted_tokens, "Draft tokens accepted.")]:
            yield CounterMetricFamily(f"agentspec_{name}_tokens", doc, value=value)
        by_source = CounterMetricFamily("agentspec_accepted_tokens_by_source", "Accepted draft tokens by source.",
                                        labels=["source"])
        hit_rate = GaugeMetricFamily("agentspec_hit_rate", "Accepted tokens from a source / output tokens.",
                                     labels=["source"])
        for source, n in sorted(t.accepted_by_source.items()):
            by_source.add_metric([source], n)
            hit_rate.add_metric([source], n / t.output_tokens if t.output_tokens else 0.0)
        yield by_source
        yield hit_rate
        yield CounterMetricFamily("agentspec_steps", "Verification steps (target forwards while decoding).",
                                  value=t.steps)


class ServerMetrics:
    """The metrics one app exports; ``render()`` is the ``/metrics`` body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("agentspec_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.rejected = Counter("agentspec_rejected_requests", "Requests refused with 503 (queue full).",
                                registry=self.registry)
        self.latency = Histogram("agentspec_request_seconds", "Request latency (streams: until the last event).",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("agentspec_time_to_first_token_seconds",
                                     "From a generation's admission to its first token.",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens_per_step = Histogram("agentspec_tokens_per_step", "Output tokens per verification step.",
                                         buckets=TOKENS_PER_STEP_BUCKETS, registry=self.registry)
        Gauge("agentspec_requests_in_flight", "Generation requests admitted and not finished (queue depth).",
              registry=self.registry).set_function(in_flight)
        self._spec = _SpecTotals()
        self.registry.register(self._spec)

    def finished(self, stats: SpecStats) -> None:
        """Count one finished generation."""
        self._spec.add(stats)
        if stats.steps:
            self.tokens_per_step.observe(stats.tokens_per_step)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by endpoint (the route's path) and status."""

    def __init__(self, app: Any, metrics: ServerMetrics, endpoints: frozenset[str]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"
        status = [500]
        t0 = time.perf_counter()

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
