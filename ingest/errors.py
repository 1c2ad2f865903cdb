"""One JSON error shape for every failure: `{"error": {"code": ..., "message": ...}}`.

Project exceptions map to their own status; Falcon's HTTP errors keep theirs; anything else is a
500 whose details stay in the log.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import falcon

from common.errors import (
    DependencyUnavailable,
    PixelmillError,
    RangeNotSatisfiable,
    TooManyRequests,
)

log = logging.getLogger(__name__)


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def status_code_name(status: int) -> str:
    """`not_found`, `method_not_allowed`...: the status phrase in the project's code style."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "error"
    return phrase.lower().replace(" ", "_").replace("-", "_")


def handle_pixelmill_error(
    req: falcon.Request, resp: falcon.Response, ex: PixelmillError, params: dict[str, Any]
) -> None:
    resp.status = falcon.code_to_http_status(ex.status)
    resp.media = error_body(ex.code, ex.message)
    if isinstance(ex, DependencyUnavailable):
        resp.media["error"]["dependency"] = ex.dependency
        resp.set_header("Retry-After", str(ex.retry_after))
        log.warning("%s %s: %s unavailable", req.method, req.path, ex.dependency)
    elif isinstance(ex, TooManyRequests):
        resp.set_header("Retry-After", str(ex.retry_after))
    elif isinstance(ex, RangeNotSatisfiable):
        resp.set_header("Content-Range", f"bytes */{ex.size}")

    challenge = getattr(ex, "www_authenticate", None)
    if challenge:
        resp.set_header("WWW-Authenticate", challenge)


def handle_unexpected(
    req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict[str, Any]
) -> None:
    if isinstance(ex, falcon.HTTPError):
        serialize_http_error(req, resp, ex)
        return
    log.exception("unhandled error on %s %s", req.method, req.path)
    resp.status = falcon.HTTP_500
    resp.media = error_body("internal_error", "internal server error")


def serialize_http_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError) -> None:
    resp.content_type = falcon.MEDIA_JSON
    resp.media = error_body(
        status_code_name(ex.status_code),
        ex.description or status_code_name(ex.status_code).replace("_", " "),
    )


def install(app: falcon.App) -> None:
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(PixelmillError, handle_pixelmill_error)
    app.set_error_serializer(serialize_http_error)
