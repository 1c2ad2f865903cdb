"""Clients cannot add series to `/metrics`: every label of the request metrics comes from a
bounded set, whatever method, path or status a request brings."""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Iterator

import falcon
import falcon.testing
import pytest

from ingest.metrics import KNOWN_METHODS, OTHER, UNMATCHED_ROUTE, request_labels
from tests.support import served_api

ROUTES = {
    "/health",
    "/ready",
    "/metrics",
    "/openapi.json",
    "/api/v1/upload",
    "/api/v1/uploads",
    "/api/v1/images",
    "/api/v1/images/{image_id}",
    UNMATCHED_ROUTE,
}
_SERIES = re.compile(r"^(pixelmill_http_request\w*)\{(.*)\} ", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@pytest.fixture(scope="module")
def served(env, settings, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("metrics-api") / "api.log"
    with served_api(env, log, "--workers", "1", "--threads", "4") as (base, _):
        yield base


def raw_request(base: str, method: str, path: str) -> bytes:
    """Send one request as written, whatever its method; the answer's status line."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


def request_series(base: str) -> list[dict[str, str]]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=20) as response:
        text = response.read().decode()
    return [dict(_LABEL.findall(labels)) for _, labels in _SERIES.findall(text)]


def test_odd_methods_and_paths_add_no_series(served: str) -> None:
    for number in range(60):
        status_line = raw_request(served, f"Q{number:06d}", f"/probe/{number}")
        assert status_line.startswith(b"HTTP/1.1 "), status_line
    raw_request(served, "GET", "/health")
    series = request_series(served)
    assert series, "the test must see the request metrics"
    methods = {s.get("method") for s in series}
    assert not any(m and m.startswith("Q0") for m in methods), sorted(map(str, methods))[:5]
    # Sixty new methods on sixty new paths may add at most the few "other" series.
    assert len(series) < 100, len(series)
    for labels in series:
        assert labels.get("method", "GET") in KNOWN_METHODS | {OTHER}, labels
        assert labels.get("route", "/health") in ROUTES, labels
        assert re.fullmatch(r"[1-5]\d\d|other", labels.get("status", "200")), labels
    assert any(s.get("method") == OTHER for s in series), "odd methods are still counted"


def test_a_status_outside_http_is_labelled_other() -> None:
    req = falcon.testing.create_req(method="BREW", path="/pot")
    resp = falcon.Response()
    resp.status = 799
    assert request_labels(req, resp) == (UNMATCHED_ROUTE, OTHER, OTHER)
