"""The object store wrapper speaks only the project's errors, whatever the S3 client raises:
against the real S3 server of the test session, a port with nothing on it, and a proxy that
answers with an HTML error page."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from common.config import Settings
from common.errors import DependencyUnavailable, ObjectMissing, ObjectTooLarge, StorageRefused
from common.storage import ObjectStore
from tests.support import free_port


def _store(settings: Settings, **changes: str) -> ObjectStore:
    return ObjectStore(dataclasses.replace(settings.storage, **changes))


def test_reading_a_missing_original_is_object_missing(settings: Settings) -> None:
    store = ObjectStore(settings.storage)
    key = f"originals/{uuid.uuid4()}"

    with pytest.raises(ObjectMissing):
        store.read_original_into(key, memoryview(bytearray(1024)))
    with pytest.raises(ObjectMissing):
        store.get_original(key)


def test_an_original_larger_than_its_buffer_is_too_large_and_nothing_is_written_past_it(
    settings: Settings,
) -> None:
    store = ObjectStore(settings.storage)
    key = f"originals/{uuid.uuid4()}"
    store.put_original(key, b"x" * 2048, "application/octet-stream")
    backing = bytearray(1024 + 16)

    with pytest.raises(ObjectTooLarge, match="larger than its 1024-byte slot"):
        store.read_original_into(key, memoryview(backing)[:1024])
    assert backing[1024:] == bytes(16)


def test_an_original_that_fits_is_read_whole(settings: Settings) -> None:
    store = ObjectStore(settings.storage)
    key = f"originals/{uuid.uuid4()}"
    store.put_original(key, b"abc" * 100, "application/octet-stream")
    buffer = bytearray(4096)

    assert store.read_original_into(key, memoryview(buffer)) == 300
    assert bytes(buffer[:300]) == b"abc" * 100


def test_a_store_nobody_listens_on_is_unavailable_not_refused(settings: Settings) -> None:
    store = _store(settings, endpoint=f"127.0.0.1:{free_port()}")

    with pytest.raises(DependencyUnavailable) as raised:
        store.read_original_into("originals/x", memoryview(bytearray(16)))
    assert type(raised.value) is DependencyUnavailable
    with pytest.raises(DependencyUnavailable):
        store.put_result("results/x.png", b"png", "image/png")


def test_wrong_credentials_are_refused(settings: Settings) -> None:
    store = _store(settings, access_key="nobody-we-know", secret_key="not-the-secret")

    with pytest.raises(StorageRefused) as raised:
        store.put_result(f"results/{uuid.uuid4()}.png", b"png", "image/png")
    assert raised.value.dependency == "object storage"
    assert isinstance(raised.value, DependencyUnavailable), "callers treat it as an outage"


def _html_proxy(status: int) -> tuple[ThreadingHTTPServer, list[str]]:
    """A proxy in front of S3 that has lost its upstream: every request gets an HTML page."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append(self.command)
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            page = f"<html><body><h1>{status} from the proxy</h1></body></html>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.fixture(params=[502, 429, 403])
def html_proxy(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[str]]]:
    server, seen = _html_proxy(request.param)
    yield f"127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_an_html_error_page_from_a_proxy_is_transient(
    settings: Settings, html_proxy: tuple[str, list[str]]
) -> None:
    endpoint, seen = html_proxy
    store = _store(settings, endpoint=endpoint)

    with pytest.raises(DependencyUnavailable) as read:
        store.read_original_into(f"originals/{uuid.uuid4()}", memoryview(bytearray(64)))
    with pytest.raises(DependencyUnavailable) as written:
        store.put_result(f"results/{uuid.uuid4()}.png", b"png", "image/png")

    assert seen, "the requests must have reached the proxy"
    for raised in (read, written):
        # Neither "missing" (the image would fail) nor "refused": the job is simply retried.
        assert type(raised.value) is DependencyUnavailable
