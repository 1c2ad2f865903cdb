"""The OpenAPI 3.1 description of the HTTP API, served at `/openapi.json`.

Kept true by a test that compares it with the routes the app really has and validates real
responses against its schemas.
"""

from __future__ import annotations

from typing import Any

import falcon

from common.config import Settings
from common.formats import UPLOAD_CONTENT_TYPE_BY_FORMAT
from db.batches import BATCH_STATUSES, COUNTED_STATUSES, EVENT_KINDS
from db.images import STATUSES
from ingest.routes.images import MAX_IDS

IMAGE_TYPES = sorted(UPLOAD_CONTENT_TYPE_BY_FORMAT.values())

ERROR_DETAIL = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {
        "code": {"type": "string"},
        "message": {"type": "string"},
        "dependency": {"type": "string"},
    },
}

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"$ref": "#/components/schemas/ErrorDetail"}},
}

IMAGE_RESULT = {
    "type": "object",
    "required": ["key", "content_type", "width", "height"],
    "properties": {
        "key": {"type": "string"},
        "content_type": {"type": "string"},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
    },
}

RENDITION = {
    "type": "object",
    "required": ["name", "key", "content_type", "width", "height", "bytes"],
    "properties": {
        "name": {"type": "string"},
        "key": {"type": "string"},
        "content_type": {"type": "string"},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "bytes": {
            "type": ["integer", "null"],
            "description": "null for results stored before renditions existed",
        },
        "url": {"type": "string", "description": "presigned; in single-image answers only"},
    },
}

IMAGE = {
    "type": "object",
    "required": [
        "id",
        "owner",
        "filename",
        "status",
        "content_type",
        "size_bytes",
        "sha256",
        "width",
        "height",
        "result",
        "renditions",
        "created_at",
        "updated_at",
    ],
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "owner": {"type": "string"},
        "filename": {"type": "string"},
        "status": {"$ref": "#/components/schemas/ImageStatus"},
        "error": {"type": ["string", "null"]},
        "content_type": {"$ref": "#/components/schemas/ImageContentType"},
        "size_bytes": {"type": "integer"},
        "sha256": {"type": "string"},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "result": {"anyOf": [{"$ref": "#/components/schemas/ImageResult"}, {"type": "null"}]},
        "download_url": {
            "type": ["string", "null"],
            "description": "presigned URL of the first rendition",
        },
        "renditions": {"type": "array", "items": {"$ref": "#/components/schemas/Rendition"}},
        "deduplicated": {"type": "boolean"},
        "batch_id": {"type": ["string", "null"], "format": "uuid"},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
    },
}

BULK_ITEM = {
    "type": "object",
    "required": ["index", "filename", "status"],
    "properties": {
        "index": {"type": "integer"},
        "filename": {"type": "string"},
        "status": {"type": "integer"},
        "id": {"type": "string", "format": "uuid"},
        "deduplicated": {"type": "boolean"},
        "image": {"$ref": "#/components/schemas/Image"},
        "error": {"$ref": "#/components/schemas/ErrorDetail"},
    },
}

BULK_ANSWER = {
    "type": "object",
    "required": ["items", "accepted", "rejected"],
    "properties": {
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/BulkItem"}},
        "accepted": {"type": "integer"},
        "rejected": {"type": "integer"},
    },
}

IMAGE_LIST = {
    "type": "object",
    "required": ["items"],
    "properties": {
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Image"}},
        "next_cursor": {"type": ["string", "null"]},
    },
}

# A single upload is refused as a whole unless its file is a non-empty JPEG or PNG, recognised
# by content (the part's declared type is not trusted, but clients should send it).
IMAGE_FILE = {
    "type": "string",
    "format": "binary",
    "minLength": 1,
    "description": "a non-empty JPEG or PNG file, recognised by its content",
}
# A bulk upload takes any file parts and answers for each: one that is empty, not a JPEG or
# PNG, or too large is refused in its own entry, not by failing the request.
BULK_FILE = {
    "type": "string",
    "format": "binary",
    "description": "a JPEG or PNG file; any other is refused in its own entry of the answer",
}


def _upload_form(file_schema: str, max_parts: int | None = None) -> dict[str, Any]:
    """The multipart form of an upload: one `image` file, or 1 to `max_parts` of them."""
    file_ref = {"$ref": f"#/components/schemas/{file_schema}"}
    image = (
        file_ref
        if max_parts is None
        else {"type": "array", "items": file_ref, "minItems": 1, "maxItems": max_parts}
    )
    return {"type": "object", "required": ["image"], "properties": {"image": image}}


def _json(schema_name: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}
        },
    }


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _json("Error", falcon.code_to_http_status(s)[4:]) for s in statuses}


def _upload_body(form_name: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"$ref": f"#/components/schemas/{form_name}"},
                "encoding": {"image": {"contentType": ", ".join(IMAGE_TYPES)}},
            }
        },
    }


IMAGE_ID = {
    "name": "image_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "1-200 visible ASCII characters; a retry with the same key and request "
    "gets the first answer, with another request 409",
    "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,200}$"},
}
DEDUPE = {
    "name": "dedupe",
    "in": "query",
    "required": False,
    "schema": {"type": "boolean"},
    "description": "answer with your newest earlier image of the same bytes (200) instead of a "
    "new one (with `batch`: one of that batch). An earlier copy in a batch that is no longer "
    "open answers only if it is completed with every rendition asked for; otherwise a new "
    "image is made and the settled batch is left as it was",
}


def _renditions_parameter(settings: Settings) -> dict[str, Any]:
    names = [r.name for r in settings.engine.renditions]
    return {
        "name": "renditions",
        "in": "query",
        "required": False,
        "style": "form",
        "explode": False,
        "schema": {
            "type": "array",
            "items": {"type": "string", "enum": names},
            "minItems": 1,
            "uniqueItems": True,
        },
        "description": "make only these renditions (`renditions=a,b`); an unknown name or one "
        "given twice is 400. "
        "Without it, the images get their batch's renditions (`batch`), else every configured "
        "one. With dedupe, an earlier copy lacking one of them is sent back to make it, unless "
        "it belongs to a batch that is no longer open: that copy is left as it is, and a new "
        "image is made.",
    }


BATCH_PARAM = {
    "name": "batch",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "format": "uuid"},
    "description": "the images join this open batch of yours (404 unknown, 409 not open) and "
    "get its renditions unless `renditions` names others",
}


SECURED: list[dict[str, list[str]]] = [{"bearer": []}]


def _paths(settings: Settings) -> dict[str, Any]:
    api = settings.api
    return {
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "Liveness",
                "security": [],
                "responses": {"200": {"description": "serving"}},
            }
        },
        "/ready": {
            "get": {
                "operationId": "ready",
                "summary": "Readiness: database, broker and storage answer",
                "security": [],
                "responses": {
                    "200": {"description": "ready"},
                    "503": _json("Error", "a dependency is down"),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi_document",
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI document"}},
            }
        },
        "/api/v1/upload": {
            "post": {
                "operationId": "upload_image",
                "summary": f"Upload one JPEG or PNG (at most {api.max_upload_bytes} bytes)",
                "parameters": [
                    IDEMPOTENCY_KEY,
                    DEDUPE,
                    BATCH_PARAM,
                    _renditions_parameter(settings),
                ],
                "requestBody": _upload_body("UploadForm"),
                "responses": {
                    "201": _json("Image", "accepted, pending"),
                    "200": _json("Image", "an earlier copy (dedupe=true)"),
                    **_errors(400, 401, 403, 404, 409, 411, 413, 415, 422, 429, 503),
                },
            }
        },
        "/api/v1/uploads": {
            "post": {
                "operationId": "upload_images",
                "summary": f"Upload up to {api.max_bulk_parts} images, answered per part",
                "description": "Each file part is accepted or refused on its own (a part "
                "that is empty, not a JPEG or PNG, or too large is refused in its entry); "
                "a form without any file part is refused as a whole with 400.",
                "parameters": [
                    IDEMPOTENCY_KEY,
                    DEDUPE,
                    BATCH_PARAM,
                    _renditions_parameter(settings),
                ],
                "requestBody": _upload_body("BulkUploadForm"),
                "responses": {
                    "207": _json("BulkAnswer", "one entry per image part"),
                    **_errors(400, 401, 403, 404, 409, 411, 413, 415, 429, 503),
                },
            }
        },
        "/api/v1/images": {
            "get": {
                "operationId": "list_images",
                "summary": "List images newest first, or fetch many by id",
                "parameters": [
                    {
                        "name": "ids",
                        "in": "query",
                        # Comma-separated, so that the most ids allowed fit in a request line.
                        "style": "form",
                        "explode": False,
                        "schema": {
                            "type": "array",
                            "items": {"type": "string", "format": "uuid"},
                            "maxItems": MAX_IDS,
                        },
                        "description": f"fetch these images (at most {MAX_IDS}) instead of a "
                        "page: `ids=a,b` (`ids=a&ids=b` works too)",
                    },
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"$ref": "#/components/schemas/ImageStatus"},
                        "description": "only images in this status (also with `ids`)",
                    },
                    {
                        "name": "owner",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "admins only",
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        # Not a registered format: it names the opaque token, so that a
                        # fuzzer or client can be told how to make real ones.
                        "schema": {"type": "string", "format": "cursor"},
                        "description": "a `next_cursor` this API returned; any other is 400",
                    },
                ],
                "responses": {
                    "200": _json("ImageList", "images"),
                    # A request line over 4 KiB, which many ids and long filters can make.
                    **_errors(400, 401, 403, 414, 503),
                },
            }
        },
        "/api/v1/images/{image_id}": {
            "get": {
                "operationId": "get_image",
                "summary": "One image's status, with a presigned download_url once completed",
                "parameters": [
                    IMAGE_ID,
                    {
                        "name": "wait",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 0,
                            "maximum": api.max_wait_seconds,
                        },
                        "description": "seconds to wait for a terminal status (long poll)",
                    },
                ],
                "responses": {
                    "200": _json("Image", "the image"),
                    **_errors(400, 401, 403, 404, 503),
                },
            },
            "delete": {
                "operationId": "delete_image",
                "summary": "Delete an image, its objects and cache entry (admin)",
                "parameters": [IMAGE_ID],
                "responses": {
                    "204": {"description": "deleted"},
                    **_errors(400, 401, 403, 404, 503),
                },
            },
        },
        "/api/v1/images/{image_id}/renditions/{name}": {
            "get": {
                "operationId": "get_rendition",
                "summary": "Redirect to a presigned URL of one rendition of an image",
                "parameters": [
                    IMAGE_ID,
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
                "responses": {
                    "302": {
                        "description": "the rendition's presigned URL",
                        "headers": {"Location": {"required": True, "schema": {"type": "string"}}},
                    },
                    **_errors(400, 401, 403, 404, 503),
                },
            }
        },
    }


# -- batches ------------------------------------------------------------------------------------

BATCH_COUNTS = {
    "type": "object",
    "required": list(COUNTED_STATUSES),
    "properties": {status: {"type": "integer"} for status in COUNTED_STATUSES},
}

BATCH = {
    "type": "object",
    "required": [
        "id",
        "owner",
        "name",
        "status",
        "callback_url",
        "events",
        "renditions",
        "total",
        "counts",
        "bytes_in",
        "bytes_out",
        "created_at",
        "closed_at",
        "finished_at",
        "images_per_second",
        "eta_seconds",
    ],
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "owner": {"type": "string"},
        "name": {"type": ["string", "null"]},
        "status": {
            "type": "string",
            "enum": list(BATCH_STATUSES),
            "description": "open (takes uploads), closed (finishes when its last image is "
            "terminal), finished; cancelling (cancelled, images already started still running), "
            "cancelled (settled: nothing in it changes any more)",
        },
        "callback_url": {"type": ["string", "null"]},
        "events": {"type": "array", "items": {"type": "string", "enum": list(EVENT_KINDS)}},
        "renditions": {
            "type": ["array", "null"],
            "items": {"type": "string"},
            "description": "what the batch's images get unless their upload names its own; "
            "null: every configured rendition",
        },
        "total": {"type": "integer"},
        "counts": {"$ref": "#/components/schemas/BatchCounts"},
        "bytes_in": {"type": "integer"},
        "bytes_out": {"type": "integer"},
        "created_at": {"type": "string", "format": "date-time"},
        "closed_at": {"type": ["string", "null"], "format": "date-time"},
        "finished_at": {"type": ["string", "null"], "format": "date-time"},
        "images_per_second": {"type": "number"},
        "eta_seconds": {"type": ["number", "null"]},
    },
}


def _new_batch(settings: Settings) -> dict[str, Any]:
    names = [r.name for r in settings.engine.renditions]
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "name": {"type": ["string", "null"], "maxLength": 200},
            "callback_url": {
                "type": ["string", "null"],
                # Not a registered format: a public https URL (http and private addresses only
                # where WEBHOOK_ALLOW_PRIVATE=true); a fuzzer must be told how to make them.
                "format": "webhook-url",
                "maxLength": 2000,
            },
            "events": {
                "type": "array",
                "items": {"type": "string", "enum": list(EVENT_KINDS)},
                "minItems": 1,
                "maxItems": 2,
                "uniqueItems": True,
                "contains": {"const": "batch"},
            },
            "renditions": {
                "type": ["array", "null"],
                "items": {"type": "string", "enum": names},
                "minItems": 1,
                "uniqueItems": True,
                "description": "the renditions the batch's images get (kept in configuration "
                "order) unless their upload names its own with `renditions`; an unknown name "
                "is 400. Absent or null: every configured one.",
            },
        },
    }


CREATED_BATCH = {
    "allOf": [
        {"$ref": "#/components/schemas/Batch"},
        {
            "type": "object",
            "required": ["webhook_secret"],
            "properties": {
                "webhook_secret": {
                    "type": ["string", "null"],
                    "description": "`whsec_` + base64; shown only in this answer",
                }
            },
        },
    ]
}

BATCH_LIST = {
    "type": "object",
    "required": ["items", "next_cursor"],
    "properties": {
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Batch"}},
        "next_cursor": {"type": ["string", "null"]},
    },
}


def _batch_schemas(settings: Settings) -> dict[str, Any]:
    return {
        "Batch": BATCH,
        "BatchCounts": BATCH_COUNTS,
        "NewBatch": _new_batch(settings),
        "CreatedBatch": CREATED_BATCH,
        "BatchList": BATCH_LIST,
        "RetryAnswer": {
            "type": "object",
            "required": ["requeued"],
            "properties": {"requeued": {"type": "integer"}},
        },
        "CancelAnswer": {
            "type": "object",
            "required": ["cancelled"],
            "properties": {"cancelled": {"type": "integer"}},
        },
    }


BATCH_ID = {
    "name": "batch_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
LIMIT = {
    "name": "limit",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": 100},
}
CURSOR = {
    "name": "cursor",
    "in": "query",
    "schema": {"type": "string", "format": "cursor"},
    "description": "a `next_cursor` this API returned; any other is 400",
}


def _batch_action(operation_id: str, summary: str, answer: str, status: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "parameters": [BATCH_ID],
            "responses": {
                status: _json(answer, summary),
                **_errors(400, 401, 403, 404, 409, 503),
            },
        }
    }


def _batch_paths() -> dict[str, Any]:
    return {
        "/api/v1/batches": {
            "post": {
                "operationId": "create_batch",
                "summary": "Create a batch; its webhook secret is in this answer only",
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/NewBatch"}}
                    },
                },
                "responses": {
                    "201": _json("CreatedBatch", "created, open"),
                    # 409: MAX_OPEN_BATCHES_PER_USER of yours are open already; 429: past
                    # BATCHES_PER_MINUTE.
                    **_errors(400, 401, 403, 409, 415, 429, 503),
                },
            },
            "get": {
                "operationId": "list_batches",
                "summary": "List your batches newest first (admins: anyone's with `owner`)",
                "parameters": [
                    {
                        "name": "owner",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "admins only",
                    },
                    LIMIT,
                    CURSOR,
                ],
                "responses": {
                    "200": _json("BatchList", "batches"),
                    **_errors(400, 401, 403, 503),
                },
            },
        },
        "/api/v1/batches/{batch_id}": {
            "get": {
                "operationId": "get_batch",
                "summary": "One batch: status, counts, throughput and ETA",
                "parameters": [BATCH_ID],
                "responses": {
                    "200": _json("Batch", "the batch"),
                    **_errors(400, 401, 403, 404, 503),
                },
            }
        },
        "/api/v1/batches/{batch_id}/images": {
            "get": {
                "operationId": "list_batch_images",
                "summary": "A batch's images newest first, optionally by status",
                "parameters": [
                    BATCH_ID,
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"$ref": "#/components/schemas/ImageStatus"},
                    },
                    LIMIT,
                    CURSOR,
                ],
                "responses": {
                    "200": _json("ImageList", "images"),
                    **_errors(400, 401, 403, 404, 503),
                },
            }
        },
        "/api/v1/batches/{batch_id}/close": _batch_action(
            "close_batch",
            "No more uploads join; the batch finishes when its last image is terminal",
            "Batch",
            "200",
        ),
        "/api/v1/batches/{batch_id}/retry": _batch_action(
            "retry_batch",
            "Queue the batch's failed images again, each in its own lane and shard, with a "
            "fresh count of attempts",
            "RetryAnswer",
            "202",
        ),
        "/api/v1/batches/{batch_id}/cancel": _batch_action(
            "cancel_batch",
            "Cancel the images not yet started; those in flight finish. The batch reads "
            "`cancelling` until they have, then `cancelled`, and `batch.cancelled` is sent",
            "CancelAnswer",
            "202",
        ),
    }


def _archive_paths(settings: Settings) -> dict[str, Any]:
    names = [r.name for r in settings.engine.renditions]
    zip_body = {"application/zip": {"schema": {"type": "string", "format": "binary"}}}
    length = {"Content-Length": {"required": True, "schema": {"type": "integer"}}}
    return {
        "/api/v1/batches/{batch_id}/archive": {
            "get": {
                "operationId": "get_batch_archive",
                "summary": "The batch's completed results and failed.csv as one ZIP, streamed; "
                "resumable with Range",
                "description": "Entries are stored (not recompressed), named from the original "
                "filenames (`photo.png`, `photo.thumb.webp` for another rendition, `photo~2.png` "
                "for a second image of that name); `failed.csv` lists each failed image (id, "
                "filename, reason). ZIP64 past 4 GiB or 65,535 entries. A single byte range "
                "(with `If-Range` naming the ETag) answers 206; several ranges, or an If-Range "
                "naming another version, answer the whole archive.",
                "parameters": [
                    BATCH_ID,
                    {
                        "name": "renditions",
                        "in": "query",
                        "required": False,
                        "style": "form",
                        "explode": False,
                        "schema": {
                            "type": "array",
                            "items": {"type": "string", "enum": names},
                            "minItems": 1,
                            "uniqueItems": True,
                        },
                        "description": "the renditions to include (default: the first "
                        "configured one); an unknown name or one given twice is 400",
                    },
                    {"name": "Range", "in": "header", "schema": {"type": "string"}},
                    {"name": "If-Range", "in": "header", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "the whole archive",
                        "headers": {**length, "ETag": {"schema": {"type": "string"}}},
                        "content": zip_body,
                    },
                    "206": {
                        "description": "the byte range asked for",
                        "headers": {
                            **length,
                            "Content-Range": {"required": True, "schema": {"type": "string"}},
                        },
                        "content": zip_body,
                    },
                    **_errors(400, 401, 403, 404, 416, 503),
                },
            }
        }
    }


def openapi_document(settings: Settings) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pixelmill",
            "version": "1",
            "description": "Upload images; get back the renditions the deployment names "
            "(by default one 800 px wide grayscale PNG).",
        },
        "servers": [{"url": "/"}],
        "security": SECURED,
        "paths": {**_paths(settings), **_batch_paths(), **_archive_paths(settings)},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": {
                "Error": ERROR,
                "ErrorDetail": ERROR_DETAIL,
                "ImageStatus": {"type": "string", "enum": list(STATUSES)},
                "ImageContentType": {"type": "string", "enum": IMAGE_TYPES},
                "ImageResult": IMAGE_RESULT,
                "Rendition": RENDITION,
                "Image": IMAGE,
                "BulkItem": BULK_ITEM,
                "BulkAnswer": BULK_ANSWER,
                "ImageList": IMAGE_LIST,
                "ImageFile": IMAGE_FILE,
                "BulkImageFile": BULK_FILE,
                "UploadForm": _upload_form("ImageFile"),
                "BulkUploadForm": _upload_form("BulkImageFile", settings.api.max_bulk_parts),
                **_batch_schemas(settings),
            },
        },
    }


class OpenApiResource:
    auth_required = False

    def __init__(self, document: dict[str, Any]) -> None:
        self._document = document

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self._document
