"""Slow upload bodies cannot take an API process: a body has a deadline scaled to its length,
uploads hold at most some of a process's threads (the rest are refused at once, before their
bodies are read), each user has a share of those, and /health and /metrics keep answering.

Real gunicorn, raw sockets on loopback sending a byte at a time; durations are short because
the settings make them short, not because of the machine's speed."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import StackProbe, jpeg, multipart, served_api, wait_for

pytestmark = pytest.mark.slow

# One process of four threads: two may read uploads, two stay for everything else.
ONE_PROCESS = ("--workers", "1", "--threads", "4")
TRICKLE_SECONDS = 0.5


class SlowUpload:
    """One upload over a raw socket: headers and the first bytes of the body at once, then, from
    a thread, `piece` bytes every `interval` s until stopped or the body is sent."""

    def __init__(
        self,
        base: str,
        token: str,
        body: bytes,
        content_type: str,
        piece: int = 1,
        interval: float = TRICKLE_SECONDS,
        chunked: bool = False,
    ) -> None:
        host, port = base.removeprefix("http://").split(":")
        # A chunked body trickles as one chunk, announced whole and sent a byte at a time.
        framing = (
            f"Transfer-Encoding: chunked\r\n\r\n{len(body):x}\r\n"
            if chunked
            else f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.body = body
        self.piece = piece
        self.interval = interval
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.sendall(
            b"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Type: {content_type}\r\n".encode()
            + framing.encode()
            + body[:100]
        )
        self.sent = 100
        self.received = b""
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._trickle, daemon=True)
        self._sender.start()

    def _trickle(self) -> None:
        while self.sent < len(self.body) and not self._stop.wait(self.interval):
            piece = self.body[self.sent : self.sent + self.piece]
            try:
                self.sock.sendall(piece)
            except OSError:
                return  # the server answered and closed
            self.sent += len(piece)

    def stop_trickling(self) -> None:
        self._stop.set()
        self._sender.join()

    def send_the_rest(self) -> None:
        self.stop_trickling()
        self.sock.sendall(self.body[self.sent :])
        self.sent = len(self.body)

    def answer(self, wait: float = 0.2) -> tuple[int, dict[str, str], dict] | None:
        """The response, once it has fully arrived; None while it has not (waits `wait` s)."""
        try:
            self.sock.settimeout(wait)
            chunk = self.sock.recv(65536)
            self.received += chunk
        except TimeoutError:
            pass
        head, sep, payload = self.received.partition(b"\r\n\r\n")
        if not sep:
            return None
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        if len(payload) < int(headers.get("content-length", "0")):
            return None
        return int(status_line.split()[1]), headers, json.loads(payload or b"null")

    def close(self) -> None:
        self.stop_trickling()
        self.sock.close()


@pytest.fixture
def slow_uploads() -> Iterator[list[SlowUpload]]:
    """Every SlowUpload a test opens, closed at its end."""
    opened: list[SlowUpload] = []
    yield opened
    for upload in opened:
        upload.close()


def upload_body(seed: int = 1) -> tuple[bytes, str]:
    return multipart([("image", "slow.jpg", jpeg(64, 48, seed=seed), "image/jpeg")])


def get(url: str) -> tuple[int, bytes]:
    """A GET that must be answered within 20 s: a liveness probe's patience, generously."""
    with urllib.request.urlopen(url, timeout=20) as response:
        return response.status, response.read()


def post_upload(base: str, token: str, seed: int) -> tuple[int, dict[str, str], dict]:
    body, content_type = upload_body(seed)
    request = urllib.request.Request(
        f"{base}/api/v1/upload",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def new_user(issuer) -> tuple[str, str]:
    sub = f"slow-{uuid.uuid4()}"
    return sub, issuer.mint_token(sub, ("user",))


def test_health_and_metrics_answer_while_slow_uploads_fill_every_upload_thread(
    env, settings, issuer, tmp_path: Path, slow_uploads: list[SlowUpload]
) -> None:
    overrides = {"BODY_TIMEOUT_SECONDS": "10", "BODY_MIN_BYTES_PER_SECOND": "10"}
    with served_api(env, tmp_path / "api.log", *ONE_PROCESS, **overrides) as (base, _):
        body, content_type = upload_body()
        # More slow uploads than the process has threads, each from a user of its own.
        for _ in range(6):
            slow_uploads.append(SlowUpload(base, new_user(issuer)[1], body, content_type))

        assert get(f"{base}/health") == (200, b'{"status": "ok"}')
        status, metrics = get(f"{base}/metrics")
        assert status == 200 and b"pixelmill_http_requests_total" in metrics

        def answered() -> list[tuple[int, dict[str, str], dict]]:
            return [a for a in (u.answer() for u in slow_uploads) if a is not None]

        refused = wait_for(lambda: len(answered()) >= 4, timeout=30) and answered()
        assert len(refused) == 4, "two uploads are read, the others refused"
        for status, headers, document in refused:
            assert status == 503, document
            assert document["error"]["code"] == "service_unavailable"
            assert int(headers["retry-after"]) > 0
        # Refused before their bodies were read: none of them had sent it all.
        assert all(u.sent < len(u.body) for u in slow_uploads)


def test_a_body_trickling_inside_the_read_timeout_is_cut_off_at_its_deadline(
    env, settings, issuer, probe: StackProbe, tmp_path: Path, slow_uploads: list[SlowUpload]
) -> None:
    # Each byte comes well inside the 3 s read timeout; the ~3 KB body has 3 s + 3 s in all.
    overrides = {"BODY_TIMEOUT_SECONDS": "3", "BODY_MIN_BYTES_PER_SECOND": "1000"}
    with served_api(env, tmp_path / "api.log", *ONE_PROCESS, **overrides) as (base, _):
        user, token = new_user(issuer)
        body, content_type = upload_body()
        assert 1000 < len(body) < 8000
        upload = SlowUpload(base, token, body, content_type)
        slow_uploads.append(upload)

        status, _, document = wait_for(upload.answer, timeout=60)

        assert status == 408, document
        assert document["error"]["code"] == "request_timeout"
        assert upload.sent < len(body)
        assert probe.rows_for(user) == [], "a body cut off stores nothing"
        # A body that keeps the minimum rate is accepted (about 1.5 KB/s against 1 KB/s).
        steady, steady_token = new_user(issuer)
        assert steady_upload(base, steady_token) == 201
        assert len(probe.rows_for(steady)) == 1


def steady_upload(base: str, token: str) -> int:
    """An upload sent in ten pieces, 0.2 s apart; its status."""
    body, content_type = upload_body(seed=7)
    upload = SlowUpload(base, token, body, content_type, piece=len(body) // 10 + 1, interval=0.2)
    try:
        return int(wait_for(upload.answer, timeout=60)[0])
    finally:
        upload.close()


def test_one_user_gets_429_past_their_share_and_others_still_upload(
    env, settings, issuer, probe: StackProbe, tmp_path: Path, slow_uploads: list[SlowUpload]
) -> None:
    overrides = {"MAX_UPLOADS_PER_USER": "1", "BODY_MIN_BYTES_PER_SECOND": "10"}
    with served_api(env, tmp_path / "api.log", *ONE_PROCESS, **overrides) as (base, _):
        alice, alice_token = new_user(issuer)
        body, content_type = upload_body()
        first = SlowUpload(base, alice_token, body, content_type)
        second = SlowUpload(base, alice_token, body, content_type)
        slow_uploads.extend([first, second])

        status, headers, document = wait_for(lambda: first.answer() or second.answer(), 30)
        assert status == 429, document
        assert document["error"]["code"] == "too_many_requests"
        assert int(headers["retry-after"]) > 0
        reading = second if first.answer() is not None else first

        bob, bob_token = new_user(issuer)
        assert post_upload(base, bob_token, seed=2)[0] == 201

        reading.send_the_rest()
        assert wait_for(reading.answer, timeout=30)[0] == 201
        # Her finished upload gave her slot back.
        assert post_upload(base, alice_token, seed=3)[0] == 201
        assert len(probe.rows_for(alice)) == 2 and len(probe.rows_for(bob)) == 1


def closed_by_server(upload: SlowUpload) -> bool:
    """Whether the server has closed the connection (an end of stream or a reset after the
    answer); False while it is still open."""
    try:
        upload.sock.settimeout(0.2)
        return upload.sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_uploads_refused_unread_are_answered_connection_close_and_closed_while_they_trickle(
    env, settings, issuer, tmp_path: Path, slow_uploads: list[SlowUpload]
) -> None:
    overrides = {"MAX_UPLOADS_PER_USER": "1", "BODY_MIN_BYTES_PER_SECOND": "10"}
    with served_api(env, tmp_path / "api.log", *ONE_PROCESS, **overrides) as (base, _):
        _, token = new_user(issuer)
        body, content_type = upload_body()
        too_long = body + b"\0" * (2 * settings.api.max_upload_bytes)
        # One user's uploads past their share (429), a bad token (401), a declared length over
        # MAX_UPLOAD_BYTES (413), then a chunked body (411): each refused before its body is
        # read, each trickling on.
        for _ in range(7):
            slow_uploads.append(SlowUpload(base, token, body, content_type))
        slow_uploads.append(SlowUpload(base, "not-a-token", body, content_type))
        slow_uploads.append(SlowUpload(base, new_user(issuer)[1], too_long, content_type))

        def answered() -> list[tuple[SlowUpload, int, dict[str, str]]]:
            return [(u, a[0], a[1]) for u in slow_uploads if (a := u.answer()) is not None]

        wait_for(lambda: len(answered()) >= 8, timeout=60)
        slow_uploads.append(SlowUpload(base, new_user(issuer)[1], body, content_type, chunked=True))
        refused = wait_for(lambda: len(answered()) >= 9 and answered(), timeout=60)
        statuses = sorted(status for _, status, _ in refused)
        assert statuses == [401, 411, 413, *[429] * 6], statuses
        for _, status, headers in refused:
            assert headers["connection"] == "close", (status, headers)
        closed = [upload for upload, _, _ in refused]
        wait_for(lambda: all(closed_by_server(u) for u in closed), timeout=60)
        # Closed unread: none had sent its body, and each is still trickling meanwhile.
        assert all(u.sent < len(u.body) for u in slow_uploads)
        assert get(f"{base}/health") == (200, b'{"status": "ok"}')
        [reading] = [u for u in slow_uploads if u not in closed]
        assert reading.answer() is None and not closed_by_server(reading)
