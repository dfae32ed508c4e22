"""Prometheus metrics: per-route request counts and latencies, uploads, jobs, queue depth.

The middleware is plain ASGI (no per-request Request object), labels requests by their
route template (`/v1/jobs/{job_id}`, never the raw path, so label cardinality stays
bounded) and costs a few microseconds. Each app has its own registry.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorafold.service.context import ServiceContext
from lorafold.service.queues import job_types, make_queue

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)


class QueueDepthCollector(Collector):
    """Jobs waiting per queue, read from Redis at scrape time."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("lorafold_queue_depth", "jobs waiting in each queue",
                                   labels=["queue"])
        for job_type in job_types():
            queue = make_queue(self._ctx.redis, self._ctx.settings, job_type)
            try:
                family.add_metric([queue.name], float(queue.count))
            except RedisError:
                continue
        yield family


class Metrics:
    def __init__(self, ctx: ServiceContext | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lorafold_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("lorafold_http_request_duration_seconds",
                                 "HTTP request latency by route", ["method", "route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.upload_bytes = Counter("lorafold_upload_bytes",
                                    "bytes received in adapter uploads",
                                    registry=self.registry)
        self.uploads = Counter("lorafold_uploads", "adapter uploads by outcome", ["outcome"],
                               registry=self.registry)
        self.jobs_submitted = Counter("lorafold_jobs_submitted", "jobs submitted by type",
                                      ["type"], registry=self.registry)
        if ctx is not None:
            self.registry.register(QueueDepthCollector(ctx))


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(
                time.perf_counter() - started)
