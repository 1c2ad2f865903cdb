"""JSON answers for the requests gunicorn refuses itself, before the app sees them.

gunicorn parses the request line and the headers. What it cannot accept (a header over the size
limit, a request line too long or malformed, a broken chunked body) it answers on its own,
with an HTML page written by `gunicorn.util.write_error`. pixelmill promises one JSON error
shape for every failure, so each API worker replaces that writer, once at start, with
`write_json_error`: gunicorn still decides the status, only the body changes.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from gunicorn import util

from ingest.errors import error_body, status_code_name

# Plain words for the statuses gunicorn uses; its own messages name parser internals.
_MESSAGES = {
    400: "the HTTP request is malformed",
    414: "the request line (method and URL) is too long",
    431: "a request header is too large, or there are too many headers",
}


def json_error_response(status: int, reason: str, detail: str) -> bytes:
    """A complete HTTP/1.1 response carrying the project's error shape; the connection closes."""
    # The app calls its own 500s `internal_error`; a worker's 500 says the same.
    code = "internal_error" if status == 500 else status_code_name(status)
    message = _MESSAGES.get(status, reason.lower() or "the request was refused")
    if detail:
        message = f"{message} ({detail})"
    body = json.dumps(error_body(code, message)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        "Cache-Control: no-store\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """Drop-in for `gunicorn.util.write_error` (same arguments), writing JSON instead of HTML."""
    util.write_nonblock(sock, json_error_response(status_int, reason, mesg))


def use_json_protocol_errors(worker: Any = None) -> None:
    """gunicorn `post_worker_init` hook: from now on this worker answers protocol errors in JSON."""
    util.write_error = write_json_error
