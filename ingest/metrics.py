"""Prometheus metrics of the API: requests by route and status, latency, upload bytes.

Under gunicorn the metrics of all worker processes are merged through prometheus_client's
multiprocess mode, in the directory `pixelmill-api` shares between them (`ServerSettings`).
"""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import Any

import falcon
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "pixelmill_http_requests",
    "HTTP requests by route, method and status.",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "pixelmill_http_request_seconds",
    "HTTP request latency by route and method.",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
UPLOAD_BYTES = Counter("pixelmill_upload_bytes", "Bytes of request bodies on upload routes.")

_UPLOAD_ROUTES = ("/api/v1/upload", "/api/v1/uploads")

# Every label value comes from a fixed set, so no request can add series: a client chooses the
# method (gunicorn passes any token) and the path, and statuses are whatever the code sets.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
KNOWN_STATUSES = frozenset(str(status.value) for status in HTTPStatus)
OTHER = "other"
UNMATCHED_ROUTE = "unmatched"


def request_labels(req: falcon.Request, resp: falcon.Response) -> tuple[str, str, str]:
    """(route, method, status) of a request, each from a bounded set: the route is the template
    the app registered (or `unmatched`), anything else unknown is `other`."""
    route = req.uri_template or UNMATCHED_ROUTE
    method = req.method if req.method in KNOWN_METHODS else OTHER
    status = str(resp.status_code)
    return route, method, status if status in KNOWN_STATUSES else OTHER


class MetricsMiddleware:
    """Counts and times every request, labelled by route template (never by raw path)."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool
    ) -> None:
        route, method, status = request_labels(req, resp)
        REQUESTS.labels(route, method, status).inc()
        started = getattr(req.context, "started", None)
        if started is not None:
            LATENCY.labels(route, method).observe(time.perf_counter() - started)
        if route in _UPLOAD_ROUTES and req.content_length:
            UPLOAD_BYTES.inc(req.content_length)


class MetricsResource:
    """`GET /metrics` in Prometheus' text format (unauthenticated, like /health): this process's
    metrics, or every worker's merged when given their multiprocess directory."""

    auth_required = False

    def __init__(self, multiprocess_dir: str = "") -> None:
        self._multiprocess_dir = multiprocess_dir

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        registry: CollectorRegistry = REGISTRY
        if self._multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self._multiprocess_dir)
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = generate_latest(registry)
