"""Cross-cutting request handling: request ids, authentication and security headers."""

from __future__ import annotations

import re
import uuid
from typing import Any

import falcon

from ingest.auth import TokenVerifier, require_role

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


class BodyTimeoutMiddleware:
    """Bounds how long a client may stall while sending its body.

    gunicorn's gthread worker only times out the wait for a request's first bytes; a client
    stalling mid-body would hold a worker thread forever. A timeout on the request's socket
    (gunicorn resets it for the next request) makes the stalled read fail, answered 408.
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        sock = req.env.get("gunicorn.socket")
        if sock is not None:
            sock.settimeout(self._seconds)


class SecurityHeadersMiddleware:
    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool
    ) -> None:
        for name, value in SECURITY_HEADERS.items():
            resp.set_header(name, value)
