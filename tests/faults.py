"""Fault-injection helpers: a pausable TCP proxy and a private Redis (from ops, which the chaos
benchmark shares), an S3 proxy that fails chosen keys, and the accounting that checks the
reliability promise (every accepted upload ends terminal, exactly one result per completed
image, nothing left behind by rejected ones)."""

from __future__ import annotations

import datetime
import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg

from ops.private_services import PrivateRedis as PrivateRedis
from ops.tcp_proxy import TcpProxy as TcpProxy
from tests.support import ApiClient, StackProbe


@dataclass
class UploadLog:
    """What the clients saw: accepted ids by upload name, and refusals while a dependency was
    down (503), which a client retries."""

    accepted: dict[str, str] = field(default_factory=dict)
    refused_503: int = 0
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Set when a test ends early, so its client threads stop instead of outliving the stack.
    cancelled: threading.Event = field(default_factory=threading.Event)


def upload_until_accepted(
    api: ApiClient, name: str, data: bytes, log: UploadLog, deadline: float
) -> None:
    """Upload like a well-behaved client: retry on 503 until accepted or `deadline` passes."""
    while time.monotonic() < deadline and not log.cancelled.is_set():
        response = api.upload(data, name)
        if response.status_code == 201:
            with log.lock:
                log.accepted[name] = response.json["id"]
            return
        if response.status_code == 503:
            assert response.json["error"]["code"] == "dependency_unavailable"
            with log.lock:
                log.refused_503 += 1
            time.sleep(0.2)
            continue
        with log.lock:
            log.unexpected.append(f"{name}: {response.status_code} {response.text[:200]}")
        return
    with log.lock:
        log.unexpected.append(f"{name}: still refused at the deadline")


@dataclass(frozen=True)
class Tally:
    """The figures of one fault scenario."""

    sent: int
    accepted: int
    refused_503: int
    completed: int
    failed: int
    lost: int
    duplicates: int


def terminal_count(probe: StackProbe, owner: str) -> int:
    with psycopg.connect(probe.settings.postgres_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM images WHERE owner = %s AND status IN ('completed', 'failed')",
            (owner,),
        ).fetchone()
    return int(row[0]) if row else 0


def first_completion_after(probe: StackProbe, owner: str, moment: float) -> float | None:
    """Wall-clock time of the first image completed after `moment` (a `time.time()` value)."""
    since = datetime.datetime.fromtimestamp(moment, datetime.UTC)
    with psycopg.connect(probe.settings.postgres_url) as conn:
        row = conn.execute(
            "SELECT min(updated_at) FROM images "
            "WHERE owner = %s AND status = 'completed' AND updated_at >= %s",
            (owner, since),
        ).fetchone()
    return None if row is None or row[0] is None else float(row[0].timestamp())


def account(probe: StackProbe, owner: str, log: UploadLog, bad_names: set[str]) -> Tally:
    """Assert the promise for one stack whose buckets hold only this owner's objects."""
    assert log.unexpected == []
    rows = {str(r[0]): r for r in probe.rows_for(owner)}
    accepted = set(log.accepted.values())
    assert len(accepted) == len(log.accepted), "two uploads were given the same id"
    assert set(rows) == accepted, "a row is missing, or a refused upload left one behind"
    assert probe.originals() == {f"originals/{i}" for i in accepted}
    for name, image_id in log.accepted.items():
        _, status, error, result_key = rows[image_id]
        if name in bad_names:
            assert status == "failed" and error, (name, status, error)
        else:
            assert status == "completed" and result_key, (name, status, error)
    completed = {i for i in accepted if rows[i][1] == "completed"}
    results = sorted(probe.results())
    assert results == sorted(f"results/{i}.png" for i in completed)
    lost = sum(1 for r in rows.values() if r[1] not in ("completed", "failed"))
    return Tally(
        sent=len(log.accepted) + log.refused_503,
        accepted=len(accepted),
        refused_503=log.refused_503,
        completed=len(completed),
        failed=len(accepted) - len(completed),
        lost=lost,
        duplicates=len(results) - len(set(results)),
    )


class FailingS3Proxy:
    """An HTTP proxy in front of the S3 server at `upstream`. Requests whose path names a failing
    key get the HTML 503 page of a proxy that lost its upstream; the rest (bucket requests, so a
    node's probe of the store, included) are forwarded: the store answers, one image fails."""

    def __init__(self, upstream: str) -> None:
        self.failing: set[str] = set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if any(key in self.path for key in proxy.failing):
                    page = b"<html><body>503 Service Unavailable</body></html>"
                    self._answer(503, [("Content-Type", "text/html")], page)
                    return
                upstream_conn = http.client.HTTPConnection(upstream, timeout=30)
                try:
                    upstream_conn.request(self.command, self.path, body, dict(self.headers))
                    response = upstream_conn.getresponse()
                    data = response.read()
                finally:
                    upstream_conn.close()
                skip = {"transfer-encoding", "connection", "content-length"}
                headers = [(k, v) for k, v in response.getheaders() if k.lower() not in skip]
                self._answer(response.status, headers, data)

            def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
