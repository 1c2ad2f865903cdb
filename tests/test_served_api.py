"""The API as deployed: real gunicorn processes, real HTTP, metrics merged across workers."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import jpeg, multipart, served_api


@pytest.fixture(scope="module")
def served(env, settings, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("api") / "api.log"
    with served_api(env, log, "--workers", "2") as (base, process):
        yield base
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, "gunicorn must stop cleanly on SIGTERM"


def call(
    method: str,
    url: str,
    token: str | None = None,
    body: bytes | None = None,
    content_type: str | None = None,
) -> tuple[int, Any, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_upload_over_real_http_completes_and_downloads(served: str, issuer, worker) -> None:
    token = issuer.mint_token(f"user-{time.time_ns()}", ("user",))
    body, content_type = multipart([("image", "test.png", jpeg(1024, 768), "image/jpeg")])
    status, _, created = call("POST", f"{served}/api/v1/upload", token, body, content_type)
    assert status == 201, created
    image_id = json.loads(created)["id"]
    status, _, done = call("GET", f"{served}/api/v1/images/{image_id}?wait=30", token)
    document = json.loads(done)
    assert document["status"] == "completed"
    status, headers, result = call("GET", document["download_url"])
    assert status == 200 and headers["Content-Type"] == "image/png" and result


def test_oversized_body_is_refused_before_it_is_read(served: str, issuer) -> None:
    token = issuer.mint_token("big-sender", ("user",))
    host, port = served.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {token}\r\n".encode()
            + b"Content-Type: multipart/form-data; boundary=b\r\n"
            + b"Content-Length: 1073741824\r\n\r\n"
        )
        received = b""
        # The server answers and closes without reading the gigabyte (recv would time out).
        while chunk := sock.recv(65536):
            received += chunk
        answer = received.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert '"payload_too_large"' in answer


def test_metrics_are_merged_across_gunicorn_workers(served: str) -> None:
    for _ in range(20):
        call("GET", f"{served}/health")
    _, headers, text = call("GET", f"{served}/metrics")
    assert headers["Content-Type"].startswith("text/plain")
    lines = [
        line
        for line in text.decode().splitlines()
        if line.startswith("pixelmill_http_requests_total{") and 'route="/health"' in line
    ]
    assert sum(float(line.split()[-1]) for line in lines) >= 20


def test_client_stalling_mid_body_gets_408_and_frees_its_thread(
    env, settings, issuer, tmp_path
) -> None:
    with served_api(env, tmp_path / "api.log", BODY_TIMEOUT_SECONDS="1") as (base, _):
        token = issuer.mint_token("staller", ("user",))
        body, content_type = multipart([("image", "a.jpg", jpeg(400, 300), "image/jpeg")])
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(
                b"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {token}\r\nContent-Type: {content_type}\r\n".encode()
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[: len(body) // 3]
            )
            answer = ""
            while "}}" not in answer and (chunk := sock.recv(65536)):
                answer += chunk.decode(errors="replace")
        assert answer.startswith("HTTP/1.1 408"), answer[:300]
        assert '"request_timeout"' in answer
