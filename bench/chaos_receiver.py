"""The chaos run's webhook receiver: a local HTTP endpoint that records every delivery and can be
made slow (each answer held back) or down (connections refused), and the check that an event
carries a valid Standard Webhooks signature, made with the project's own signing function."""

from __future__ import annotations

import enum
import hmac
import http.server
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.webhooks import signature_headers

SLOW_ANSWER_SECONDS = 2.0


class ReceiverMode(enum.Enum):
    UP = "up"
    SLOW = "slow"
    DOWN = "down"


@dataclass(frozen=True)
class Delivery:
    """One POST as received: its signature headers and body."""

    headers: dict[str, str]
    body: bytes
    received_at: float

    def event(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.body)
        return document


def signature_is_valid(secret: str, delivery: Delivery) -> bool:
    """Whether the delivery's `webhook-signature` is the one its id, timestamp and body make."""
    headers = {k.lower(): v for k, v in delivery.headers.items()}
    message_id, timestamp = headers.get("webhook-id"), headers.get("webhook-timestamp")
    if message_id is None or timestamp is None or not timestamp.isdigit():
        return False
    expected = signature_headers(secret, message_id, int(timestamp), delivery.body)
    offered = headers.get("webhook-signature", "").split()
    return any(hmac.compare_digest(expected["webhook-signature"], s) for s in offered)


class WebhookReceiver:
    """Answers 204 to every POST on 127.0.0.1 (after SLOW_ANSWER_SECONDS while slow); while down,
    its listener is closed, so senders see connections refused."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.mode = ReceiverMode.UP
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self.port = 0
        self._listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def _listen(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.mode is ReceiverMode.SLOW:
                    time.sleep(SLOW_ANSWER_SECONDS)
                receiver.record(Delivery(dict(self.headers), body, time.time()))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = int(server.server_address[1])
        self._server = server
        threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True).start()

    def record(self, delivery: Delivery) -> None:
        with self._lock:
            self.deliveries.append(delivery)

    def set_mode(self, mode: ReceiverMode) -> None:
        if mode is ReceiverMode.DOWN and self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        elif mode is not ReceiverMode.DOWN and self._server is None:
            self._listen()
        self.mode = mode

    def finished_events(self) -> dict[str, list[Delivery]]:
        """batch id -> the `batch.finished` deliveries received for it."""
        found: dict[str, list[Delivery]] = {}
        with self._lock:
            deliveries = list(self.deliveries)
        for delivery in deliveries:
            try:
                event = delivery.event()
            except ValueError:
                continue
            if event.get("type") == "batch.finished":
                found.setdefault(str(event.get("data", {}).get("id")), []).append(delivery)
        return found

    def close(self) -> None:
        self.set_mode(ReceiverMode.DOWN)


def verified_finished(
    receiver: WebhookReceiver, secrets: Mapping[str, str]
) -> tuple[set[str], int]:
    """(batches with at least one validly signed `batch.finished`, deliveries whose signature
    did not verify) for the batches of `secrets` (batch id -> signing secret)."""
    verified: set[str] = set()
    forged = 0
    for batch_id, deliveries in receiver.finished_events().items():
        secret = secrets.get(batch_id)
        for delivery in deliveries:
            if secret is not None and signature_is_valid(secret, delivery):
                verified.add(batch_id)
            else:
                forged += 1
    return verified, forged
