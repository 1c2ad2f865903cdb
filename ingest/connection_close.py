"""Closing, at once, the connection of a request answered before its body was read (a refused
upload: 401, 413, 429...), so that a client trickling that body holds nothing of the server.

Three pieces, because gunicorn decides what happens to a connection after the app answered:
- `request_close` (called by `ingest.middleware`) marks the body `failed`, so gunicorn does
  not drain it, and asks gunicorn's request to close, so the answer says `Connection: close`;
- `expose_close` (gunicorn's `pre_request` hook in `ingest.serve`) is what lets the app reach
  gunicorn's request through the body object it is given as `wsgi.input`;
- `CloseRefusedConnections` (around the app) shuts the socket down in the request's own thread
  once the answer is written. Without it gunicorn's close lingers on its main thread, reading
  the trickling body for up to 2 s per connection before it accepts or polls anything else, so
  a few such clients delay every request of the process, /health included.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

CLOSE_AFTER_ANSWER = "pixelmill.close_after_answer"

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def request_close(environ: dict[str, Any], gunicorn_body: Any) -> None:
    """Have the connection closed, unread, once this request is answered."""
    # gunicorn's own flag for a body whose reading failed: it then closes instead of draining.
    gunicorn_body.failed = True
    close = getattr(gunicorn_body, "close_connection", None)
    if close is not None:
        close()
    environ[CLOSE_AFTER_ANSWER] = True


def expose_close(worker: Any, req: Any) -> None:
    """gunicorn `pre_request` hook: the body object the app gets can close its connection."""
    body = getattr(req, "body", None)
    if body is not None:
        body.close_connection = req.force_close


class CloseRefusedConnections:
    """WSGI middleware: after answering a request marked by `request_close`, shuts its socket
    down (both ways) from the request's thread, so that gunicorn's close finds nothing to read."""

    def __init__(self, app: WsgiApp) -> None:
        self._app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        answer = self._app(environ, start_response)
        sock = environ.get("gunicorn.socket")
        if not environ.get(CLOSE_AFTER_ANSWER) or sock is None:
            return answer
        return _ShutDownWhenClosed(answer, sock)


class _ShutDownWhenClosed:
    """The answer's body; gunicorn calls `close` once it has written all of it."""

    def __init__(self, answer: Iterable[bytes], sock: socket.socket) -> None:
        self._answer = answer
        self._sock = sock

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._answer)

    def close(self) -> None:
        try:
            close = getattr(self._answer, "close", None)
            if close is not None:
                close()
        finally:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
