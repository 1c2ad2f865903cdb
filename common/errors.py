"""The project's own exceptions; `ingest.errors` maps each to one HTTP status and JSON shape."""

from __future__ import annotations


class PixelmillError(Exception):
    """Base class: a failure with a stable machine-readable `code` and an HTTP `status`."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(PixelmillError):
    status = 400
    code = "bad_request"


class NotFound(PixelmillError):
    status = 404
    code = "not_found"


class RequestTimeout(PixelmillError):
    status = 408
    code = "request_timeout"


class Conflict(PixelmillError):
    status = 409
    code = "conflict"


class LengthRequired(PixelmillError):
    status = 411
    code = "length_required"


class PayloadTooLarge(PixelmillError):
    status = 413
    code = "payload_too_large"


class RangeNotSatisfiable(PixelmillError):
    """A `Range` that starts past the end of the resource; `size` is its length."""

    status = 416
    code = "range_not_satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(f"the range starts past the end of the {size} bytes")
        self.size = size


class UnsupportedMediaType(PixelmillError):
    status = 415
    code = "unsupported_media_type"


class UnprocessableImage(PixelmillError):
    status = 422
    code = "unprocessable_image"


class TooManyRequests(PixelmillError):
    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DependencyUnavailable(PixelmillError):
    """A backing service (database, broker, object store) did not answer; the client may retry."""

    status = 503
    code = "dependency_unavailable"

    def __init__(self, dependency: str, message: str | None = None) -> None:
        super().__init__(message or f"{dependency} is unavailable, retry later")
        self.dependency = dependency
        self.retry_after = 5


class StorageRefused(DependencyUnavailable):
    """The object store answered but refused the request (credentials, a missing bucket).

    A subclass of `DependencyUnavailable` because, to a caller, the store is out of order until
    an operator fixes it: an upload answers 503 and a job goes back to the queue, as for an
    outage."""

    def __init__(self, dependency: str, reason: str) -> None:
        super().__init__(dependency, f"{dependency} refused the request ({reason}), retry later")
        self.reason = reason


class ObjectMissing(NotFound):
    """No object is stored under this key."""


class ObjectTooLarge(UnprocessableImage):
    """A stored object does not fit the buffer it is read into."""
