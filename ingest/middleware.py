"""Cross-cutting request handling: request ids, authentication, security headers, and the
limits that keep slow upload bodies from taking every thread of an API process."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import uuid
from collections import Counter
from typing import Any, BinaryIO

import falcon

from common.config import ApiSettings
from common.errors import TooManyRequests
from ingest.auth import TokenVerifier, require_role
from ingest.connection_close import request_close

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class RequestIdMiddleware:
    """Takes a well-formed `X-Request-ID` from the client or makes one, and echoes it."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        supplied = req.get_header("X-Request-ID")
        if supplied and _REQUEST_ID.match(supplied):
            req.context.request_id = supplied
        else:
            req.context.request_id = uuid.uuid4().hex
        resp.set_header("X-Request-ID", req.context.request_id)


class AuthMiddleware:
    """Every resource needs a valid bearer token unless it sets `auth_required = False`;
    a resource's `required_role` (default: `user` or `admin`) is checked here too."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict[str, Any]
    ) -> None:
        if resource is None or not getattr(resource, "auth_required", True):
            return
        if req.method == "OPTIONS" and not hasattr(resource, "on_options"):
            # Browsers send CORS preflights without credentials; Falcon's own OPTIONS answer
            # (the Allow header) reveals nothing, and a 401 there would block every CORS call.
            return
        principal = self._verifier.verify(req.get_header("Authorization"))
        role = getattr(resource, f"required_role_{req.method.lower()}", None) or getattr(
            resource, "required_role", None
        )
        if role is not None:
            require_role(principal, role)
        elif not (principal.has_role("user") or principal.is_admin):
            require_role(principal, "user")
        req.context.principal = principal


class BodyDeadlinePassed(TimeoutError):
    """The body did not arrive within its deadline (answered 408, like a stalled read)."""


class DeadlineWatch:
    """One request's body deadline, kept by `BodyDeadlines`."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.expired = False


class BodyDeadlines:
    """A thread per API process that ends bodies still arriving at their deadline.

    A socket timeout bounds each read, not the body: a client sending a byte just inside it
    would hold a thread for hours, and a read blocks in gunicorn, out of the app's reach. At the
    deadline this thread shuts the read side of the request's socket, so the read in progress
    returns at once and the request is answered 408.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._watched: set[DeadlineWatch] = set()
        threading.Thread(target=self._run, name="body-deadlines", daemon=True).start()

    def watch(self, sock: socket.socket, seconds: float) -> DeadlineWatch:
        watch = DeadlineWatch(sock, time.monotonic() + seconds)
        with self._changed:
            self._watched.add(watch)
            self._changed.notify()
        return watch

    def release(self, watch: DeadlineWatch) -> None:
        """Stop watching; once this returns the socket is never touched again."""
        with self._changed:
            self._watched.discard(watch)

    def _run(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                for watch in [w for w in self._watched if w.deadline <= now]:
                    self._watched.discard(watch)
                    watch.expired = True
                    with contextlib.suppress(OSError):
                        watch.sock.shutdown(socket.SHUT_RD)
                next_deadline = min((w.deadline for w in self._watched), default=None)
                self._changed.wait(None if next_deadline is None else next_deadline - now)


class DeadlineStream:
    """The request body, raising `BodyDeadlinePassed` once its deadline cut it off; the watch
    ends as soon as the whole body is read."""

    def __init__(
        self, inner: BinaryIO, length: int, watch: DeadlineWatch, deadlines: BodyDeadlines
    ) -> None:
        self.inner = inner
        self._left = length
        self._watch = watch
        self._deadlines = deadlines

    @property
    def fully_read(self) -> bool:
        return self._left <= 0

    def read(self, size: int | None = -1) -> bytes:
        return self._checked(self.inner.read, size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._checked(self.inner.readline, size)

    def __getattr__(self, name: str) -> Any:
        # Whatever else a WSGI input offers (readlines, close...), unchecked: Falcon reads
        # bodies through read and readline.
        return getattr(self.inner, name)

    def _checked(self, read: Any, size: int | None) -> bytes:
        try:
            data: bytes = read(size)
        except Exception as exc:
            if self._watch.expired:
                raise BodyDeadlinePassed("the request body arrived too slowly") from exc
            raise
        if self._watch.expired:
            raise BodyDeadlinePassed("the request body arrived too slowly")
        self._left -= len(data)
        if self._left <= 0:
            self._deadlines.release(self._watch)
        return data


class BodyTimeoutMiddleware:
    """Bounds how long a client may take to send its body: each read, and the whole body.

    gunicorn's gthread worker only times out the wait for a request's first bytes. A timeout on
    the request's socket (gunicorn resets it for the next request) ends a stalled read; a
    deadline scaled to `Content-Length` (`ApiSettings.body_deadline_seconds`) ends a body that
    trickles in. Either is answered 408 and frees the thread.
    """

    def __init__(self, api: ApiSettings, deadlines: BodyDeadlines) -> None:
        self._api = api
        self._deadlines = deadlines

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        sock = req.env.get("gunicorn.socket")
        if sock is None:
            return
        sock.settimeout(self._api.body_timeout_seconds)
        length = req.content_length
        if length:
            seconds = self._api.body_deadline_seconds(length)
            watch = self._deadlines.watch(sock, seconds)
            req.context.body_deadline = watch
            stream = DeadlineStream(req.env["wsgi.input"], length, watch, self._deadlines)
            req.env["wsgi.input"] = req.stream = req.context.body_stream = stream

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool
    ) -> None:
        watch = getattr(req.context, "body_deadline", None)
        if watch is not None:
            self._deadlines.release(watch)
        stream = getattr(req.context, "body_stream", None)
        if stream is not None and not stream.fully_read:
            # A refused upload: reading the rest of a body the app did not want would let a
            # trickling client hold the connection (see ingest.connection_close).
            request_close(req.env, stream.inner)
        elif _is_chunked(req) and not req_succeeded and "gunicorn.socket" in req.env:
            # A chunked body has no length to tell whether it was read to its end; one of a
            # refused request (an upload without Content-Length is 411) is not wanted either.
            request_close(req.env, req.env["wsgi.input"])


def _is_chunked(req: falcon.Request) -> bool:
    return "chunked" in (req.get_header("Transfer-Encoding") or "").lower()


class UploadSlots:
    """How many uploads an API process reads at once, in all and per user.

    gunicorn's gthread worker cannot keep a thread for /health: every request takes the next
    free one. Holding uploads to `slots` threads keeps the others for /health, /metrics and
    reads however slowly upload bodies arrive; the per-user share keeps one user from taking
    all the slots.
    """

    # Slots free up as uploads end, usually within seconds.
    BUSY_RETRY_SECONDS = 2

    def __init__(self, slots: int, per_user: int) -> None:
        self.slots = slots
        self.per_user = per_user
        self._lock = threading.Lock()
        self._by_user: Counter[str] = Counter()

    def take(self, user: str) -> None:
        """A slot for `user`, or the refusal to answer at once, before the body is read."""
        with self._lock:
            if self._by_user[user] >= self.per_user:
                raise TooManyRequests(
                    f"at most {self.per_user} uploads at once per user; wait for one to finish",
                    self.BUSY_RETRY_SECONDS,
                )
            if self._by_user.total() >= self.slots:
                raise falcon.HTTPServiceUnavailable(
                    description="the server is receiving as many uploads as it can; retry soon",
                    retry_after=self.BUSY_RETRY_SECONDS,
                )
            self._by_user[user] += 1

    def give_back(self, user: str) -> None:
        with self._lock:
            self._by_user[user] -= 1
            if self._by_user[user] <= 0:
                del self._by_user[user]


class UploadSlotMiddleware:
    """Takes an upload slot for each request to an upload route, once its user is known (after
    `AuthMiddleware`), and gives it back when the request is answered."""

    def __init__(self, slots: UploadSlots, upload_routes: frozenset[str]) -> None:
        self._slots = slots
        self._routes = upload_routes

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict[str, Any]
    ) -> None:
        principal = getattr(req.context, "principal", None)
        if req.method != "POST" or req.uri_template not in self._routes or principal is None:
            return
        self._slots.take(principal.subject)
        req.context.upload_slot_user = principal.subject

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool
    ) -> None:
        user = getattr(req.context, "upload_slot_user", None)
        if user is not None:
            self._slots.give_back(user)


class SecurityHeadersMiddleware:
    """The same headers on every answer; a page (the console) names its own, still strict,
    Content-Security-Policy in `resp.context.content_security_policy`."""

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool
    ) -> None:
        for name, value in SECURITY_HEADERS.items():
            resp.set_header(name, value)
        policy = resp.context.get("content_security_policy")
        if policy:
            resp.set_header("Content-Security-Policy", policy)
