"""Reads the `image` part of a multipart upload: bounded in size, recognised by content."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import falcon
from falcon.media.multipart import BodyPart, MultipartParseError, MultipartParseOptions

from common.decode_budget import DEFAULT_MAX_DECODE_MB, MIB, over_budget_reason
from common.errors import (
    BadRequest,
    LengthRequired,
    PayloadTooLarge,
    PixelmillError,
    RequestTimeout,
    UnprocessableImage,
    UnsupportedMediaType,
)
from common.formats import UPLOAD_CONTENT_TYPE_BY_FORMAT
from common.imageinfo import ImageHeader, probe
from common.renditions import Rendition, oversized_reason

IMAGE_FIELD = "image"
# For callers that pass no decode budget of their own: MAX_DECODE_MB's default.
DEFAULT_MAX_DECODE_BYTES = DEFAULT_MAX_DECODE_MB * MIB
# Room for the boundaries and part headers around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
MAX_FILENAME_CHARS = 255
_UNSAFE_FILENAME_CHARS = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class UploadedImage:
    filename: str
    data: bytes
    header: ImageHeader
    sha256: str

    @property
    def content_type(self) -> str:
        return UPLOAD_CONTENT_TYPE_BY_FORMAT[self.header.format]


def clean_filename(raw: str | None) -> str:
    """The client's filename made safe to store and show: last path segment, no control
    characters, at most 255 characters. Only ever metadata: object keys come from the image id."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_FILENAME_CHARS.sub("", name).strip()
    if name in ("", ".", ".."):
        name = "upload"
    return name[:MAX_FILENAME_CHARS]


def check_declared_length(req: falcon.Request, max_body_bytes: int) -> None:
    """Refuse a body that is not multipart, has no length, or is too large, before reading it."""
    if not req.content_type or not req.content_type.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType("send the image as multipart/form-data in a field named 'image'")
    if req.content_length is None:
        raise LengthRequired("send a Content-Length header with the upload")
    if req.content_length > max_body_bytes + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(f"request body exceeds the {max_body_bytes}-byte limit")


def read_file_part(part: BodyPart, max_bytes: int) -> bytes:
    """Read at most `max_bytes` of one part; a larger part is refused without reading the rest."""
    data: bytes = part.stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"image exceeds the {max_bytes}-byte upload limit")
    return data


def validate_image(filename: str | None, data: bytes) -> UploadedImage:
    """Check that a complete part (`filename` None: a text field) is a JPEG or PNG file, by
    content."""
    if filename is None:
        raise BadRequest("the 'image' field must be a file, not a text value")
    if not data:
        raise BadRequest("the uploaded file is empty")
    header = probe(data)
    if header is None:
        raise UnsupportedMediaType("the file is not a JPEG or PNG image")
    return UploadedImage(
        filename=clean_filename(filename),
        data=data,
        header=header,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def check_pixel_limit(
    header: ImageHeader,
    max_pixels: int,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    renditions: Sequence[Rendition] = (),
) -> None:
    """Refuse (422) an image whose header declares more pixels, or a decode needing more memory,
    than the engine will process, or that one of the `renditions` it gets cannot be made of
    (an output past its format's size limit)."""
    if header.width * header.height > max_pixels:
        raise UnprocessableImage(
            f"image is {header.width}x{header.height} pixels, above the limit of "
            f"{max_pixels} pixels"
        )
    reason = over_budget_reason(header, max_decode_bytes) or oversized_reason(
        *header.display_size, renditions
    )
    if reason is not None:
        raise UnprocessableImage(reason)


@contextmanager
def malformed_form_is_bad_request() -> Iterator[None]:
    """Turn every way a multipart body can be malformed into one 400, including part headers
    that are not UTF-8 (Falcon decodes them lazily, when a part's name is first read)."""
    try:
        yield
    except (MultipartParseError, falcon.HTTPInvalidHeader) as exc:
        raise BadRequest(f"malformed multipart body: {exc.description}") from exc
    except UnicodeDecodeError as exc:
        raise BadRequest("malformed multipart body: part headers must be UTF-8") from exc
    except TimeoutError as exc:
        raise RequestTimeout(
            "the request body stopped arriving, or arrived too slowly; send it again"
        ) from exc


def read_single_upload(
    req: falcon.Request,
    max_bytes: int,
    max_pixels: int,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    renditions: Sequence[Rendition] = (),
) -> UploadedImage:
    """The one `image` part of a single-image upload, to be made into `renditions`; every
    other field is ignored."""
    check_declared_length(req, max_bytes)
    found: tuple[str | None, bytes] | None = None
    with malformed_form_is_bad_request():
        # The whole form is walked before the image is judged, so a truncated body is
        # reported as such rather than as a bad image.
        for part in req.get_media():
            if part.name != IMAGE_FIELD:
                continue
            if found is not None:
                raise BadRequest("send exactly one 'image' part (use /api/v1/uploads for many)")
            found = (part.filename, read_file_part(part, max_bytes))
    if found is None:
        raise BadRequest("the form has no 'image' file field")
    upload = validate_image(*found)
    check_pixel_limit(upload.header, max_pixels, max_decode_bytes, renditions)
    return upload


@dataclass(frozen=True)
class BulkLimits:
    max_parts: int
    max_body_bytes: int
    max_part_bytes: int
    max_pixels: int
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
    # The renditions the request's images get (each must fit its format's size limit).
    renditions: tuple[Rendition, ...] = ()


@dataclass(frozen=True)
class BulkPart:
    """One `image` part of a bulk upload as the answer describes it: refused with its own
    error, or an image with its digest (its bytes travel separately, to be let go of early)."""

    index: int
    filename: str
    error: PixelmillError | None = None
    sha256: str = ""


def bulk_form_handler(max_parts: int) -> falcon.media.MultipartFormHandler:
    options = MultipartParseOptions()
    # Room for a few non-image fields beside the images.
    options.max_body_part_count = max_parts + 8
    options.max_body_part_headers_size = 32 * 1024
    return falcon.media.MultipartFormHandler(options)


def iter_bulk_upload(
    req: falcon.Request, limits: BulkLimits
) -> Iterator[tuple[BulkPart, UploadedImage | None]]:
    """Each `image` part, judged as soon as it is read, with its image when it is one, so the
    caller can store it and let its bytes go before the next part arrives. Other fields are
    ignored.

    Only the whole request can fail here (not multipart, too large, too many parts, malformed),
    possibly after some parts were yielded: the caller then discards what it stored.
    """
    check_declared_length(req, limits.max_body_bytes)
    handler = bulk_form_handler(limits.max_parts)
    count = files = 0
    with malformed_form_is_bad_request():
        form = handler.deserialize(req.bounded_stream, req.content_type, req.content_length)
        for part in form:
            if part.name != IMAGE_FIELD:
                continue
            if count == limits.max_parts:
                raise PayloadTooLarge(f"send at most {limits.max_parts} images per request")
            index, count = count, count + 1
            files += part.filename is not None
            try:
                data = read_file_part(part, limits.max_part_bytes)
            except PayloadTooLarge as exc:
                yield BulkPart(index, clean_filename(part.filename), error=exc), None
                continue
            yield _judge(index, part.filename, data, limits)
    if files == 0:
        # Text values alone are not an upload: refuse the request rather than answer 207.
        raise BadRequest("the form has no 'image' file field")


def _judge(
    index: int, raw_name: str | None, data: bytes, limits: BulkLimits
) -> tuple[BulkPart, UploadedImage | None]:
    filename = clean_filename(raw_name)
    try:
        upload = validate_image(raw_name, data)
        check_pixel_limit(
            upload.header, limits.max_pixels, limits.max_decode_bytes, limits.renditions
        )
    except PixelmillError as exc:
        return BulkPart(index, filename, error=exc), None
    return BulkPart(index, filename, sha256=upload.sha256), upload
