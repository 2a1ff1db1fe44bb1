"""Prometheus metrics on a registry of our own (so several apps in one process do not clash).

HTTP requests by route template and status, jobs by state (read from the database at scrape
time), uploaded bytes, prediction latency and micro-batch sizes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "orca_http_requests_total",
    "HTTP requests by method, route template and status code",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "orca_http_request_seconds",
    "HTTP request latency by route template",
    ["route"],
    registry=REGISTRY,
)
JOBS_BY_STATE = Gauge("orca_jobs", "Jobs per state (all tenants)", ["state"], registry=REGISTRY)
UPLOAD_BYTES = Counter(
    "orca_upload_bytes_total", "Bytes of accepted dataset uploads", registry=REGISTRY
)
PREDICT_LATENCY = Histogram(
    "orca_predict_seconds",
    "Time from a validated prediction request to its answer (queueing + forward pass)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
PREDICT_BATCH_SIZE = Histogram(
    "orca_predict_batch_size",
    "Samples per forward pass after micro-batching",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
    registry=REGISTRY,
)

JOB_STATES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")


def set_job_counts(counts: dict[str, int]) -> None:
    """Refresh the jobs-by-state gauge (states with no jobs read 0)."""
    for state in sorted(set(JOB_STATES) | set(counts)):
        JOBS_BY_STATE.labels(state=state).set(counts.get(state, 0))


def render_latest() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class _RefreshingRegistry:
    """``REGISTRY`` with ``refresh`` run before each collection, so gauges read at scrape time
    (jobs by state) are current on the internal port too."""

    def __init__(self, refresh: Callable[[], None]) -> None:
        self._refresh = refresh

    def collect(self) -> Iterable[Metric]:
        self._refresh()
        return REGISTRY.collect()

    def restricted_registry(self, names: Iterable[str]) -> Any:
        self._refresh()
        return REGISTRY.restricted_registry(names)


def start_metrics_server(
    port: int, addr: str = "0.0.0.0", refresh: Callable[[], None] | None = None
) -> WSGIServer:
    """Serve /metrics on a separate (internal) port as well (``Settings.metrics_port``); the
    caller shuts the returned server down."""
    registry: Any = REGISTRY if refresh is None else _RefreshingRegistry(refresh)
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    logger.info("prometheus metrics on %s:%d", addr, port)
    return server


class PrometheusMiddleware:
    """Counts requests by route *template* (``/v1/jobs/{job_id}``) to keep label sets small."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            HTTP_REQUESTS.labels(scope.get("method", ""), template, str(status["code"])).inc()
            HTTP_LATENCY.labels(template).observe(time.perf_counter() - started)
