"""Prometheus metrics, one registry per app so that apps (and tests) never share counters."""

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# how often the event loop's lag is sampled: often enough to see a 100 ms stall several times
LAG_INTERVAL_S = 0.025
UNMATCHED = "<unmatched>"


class Metrics:
    """The server's metrics, registered in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "vae_http_requests",
            "HTTP requests by endpoint, method and status.",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "vae_http_request_duration_seconds",
            "HTTP request latency by endpoint, method and status.",
            ["endpoint", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "vae_inference_duration_seconds",
            "Time in one onnxruntime call, by network.",
            ["network"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "vae_batch_size",
            "Rows per onnxruntime call, by network.",
            ["network"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.images = Histogram(
            "vae_request_images",
            "Images (or latent vectors) per request, by endpoint.",
            ["endpoint"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "vae_batch_queue_seconds",
            "Time a request's rows waited in the micro-batch queue, by network.",
            ["network"],
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.reloads = Counter(
            "vae_model_reloads",
            "Model reloads (POST /admin/reload, SIGHUP) by result.",
            ["result"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "vae_ready", "1 when the bundle is loaded and warmed up.", registry=self.registry
        )
        self.loop_lag = Histogram(
            "vae_event_loop_lag_seconds",
            f"How late the event loop woke from a {LAG_INTERVAL_S * 1000:g} ms sleep: how long "
            "it was held (by parsing, decoding or computing on it), so how long any request "
            "waited to be served.",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.bundle_info = Gauge(
            "vae_bundle_info",
            "The loaded bundle (value 1).",
            ["name", "version", "likelihood", "latent_dim", "provider"],
            registry=self.registry,
        )

    @contextmanager
    def time_inference(self, network: str, rows: int) -> Iterator[None]:
        """Observe the duration and batch size of one onnxruntime call."""
        self.batch_size.labels(network).observe(rows)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.inference.labels(network).observe(time.perf_counter() - start)

    async def watch_event_loop(self) -> None:
        """Observe the event loop's lag into `loop_lag` until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LAG_INTERVAL_S)
            self.loop_lag.observe(max(0.0, loop.time() - start - LAG_INTERVAL_S))


class MetricsMiddleware:
    """Counts and times every HTTP request, labelled by route template (not the raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the server sends if the app raises before responding
        start = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            endpoint = (
                route.path if isinstance(route, BaseRoute) and hasattr(route, "path") else UNMATCHED
            )
            labels = (endpoint, scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
