"""The OpenAPI 3.1 description of the HTTP API, served at `/openapi.json`.

Kept true by a test that compares it with the routes the app really has and validates real
responses against its schemas.
"""

from __future__ import annotations

from typing import Any

import falcon

from common.config import Settings

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "dependency": {"type": "string"},
            },
        }
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
        "created_at",
        "updated_at",
    ],
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "owner": {"type": "string"},
        "filename": {"type": "string"},
        "status": {"enum": ["pending", "processing", "completed", "failed"]},
        "error": {"type": ["string", "null"]},
        "content_type": {"enum": ["image/jpeg", "image/png"]},
        "size_bytes": {"type": "integer"},
        "sha256": {"type": "string"},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "result": {
            "type": ["object", "null"],
            "properties": {
                "key": {"type": "string"},
                "content_type": {"type": "string"},
                "width": {"type": "integer"},
                "height": {"type": "integer"},
            },
        },
        "download_url": {"type": ["string", "null"]},
        "deduplicated": {"type": "boolean"},
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
        "error": {"$ref": "#/components/schemas/Error/properties/error"},
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


def _json(schema_name: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}
        },
    }


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _json("Error", falcon.code_to_http_status(s)[4:]) for s in statuses}


def _upload_body(many: bool) -> dict[str, Any]:
    file_schema = {"type": "string", "format": "binary"}
    image = {"type": "array", "items": file_schema} if many else file_schema
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["image"], "properties": {"image": image}}
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
    "schema": {"type": "string", "minLength": 1, "maxLength": 200},
}
DEDUPE = {"name": "dedupe", "in": "query", "required": False, "schema": {"type": "boolean"}}
SECURED: list[dict[str, list[str]]] = [{"bearer": []}]


def _paths(settings: Settings) -> dict[str, Any]:
    api = settings.api
    return {
        "/health": {
            "get": {
                "summary": "Liveness",
                "security": [],
                "responses": {"200": {"description": "serving"}},
            }
        },
        "/ready": {
            "get": {
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
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI document"}},
            }
        },
        "/api/v1/upload": {
            "post": {
                "summary": f"Upload one JPEG or PNG (at most {api.max_upload_bytes} bytes)",
                "parameters": [IDEMPOTENCY_KEY, DEDUPE],
                "requestBody": _upload_body(many=False),
                "responses": {
                    "201": _json("Image", "accepted, pending"),
                    "200": _json("Image", "an earlier copy (dedupe=true)"),
                    **_errors(400, 401, 403, 409, 411, 413, 415, 422, 429, 503),
                },
            }
        },
        "/api/v1/uploads": {
            "post": {
                "summary": f"Upload up to {api.max_bulk_parts} images, answered per part",
                "parameters": [IDEMPOTENCY_KEY, DEDUPE],
                "requestBody": _upload_body(many=True),
                "responses": {
                    "207": _json("BulkAnswer", "one entry per image part"),
                    **_errors(400, 401, 403, 409, 411, 413, 415, 429, 503),
                },
            }
        },
        "/api/v1/images": {
            "get": {
                "summary": "List images newest first, or fetch many by id",
                "parameters": [
                    {
                        "name": "ids",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "comma-separated ids (at most 100)",
                    },
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"enum": ["pending", "processing", "completed", "failed"]},
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
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": _json("ImageList", "images"), **_errors(400, 401, 403, 503)},
            }
        },
        "/api/v1/images/{image_id}": {
            "get": {
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
                "summary": "Delete an image, its objects and cache entry (admin)",
                "parameters": [IMAGE_ID],
                "responses": {
                    "204": {"description": "deleted"},
                    **_errors(400, 401, 403, 404, 503),
                },
            },
        },
    }


def openapi_document(settings: Settings) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pixelmill",
            "version": "1",
            "description": "Upload images; get them back 800 px wide in grayscale.",
        },
        "servers": [{"url": "/"}],
        "security": SECURED,
        "paths": _paths(settings),
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": {
                "Error": ERROR,
                "Image": IMAGE,
                "BulkItem": BULK_ITEM,
                "BulkAnswer": BULK_ANSWER,
                "ImageList": IMAGE_LIST,
            },
        },
    }


class OpenApiResource:
    auth_required = False

    def __init__(self, document: dict[str, Any]) -> None:
        self._document = document

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self._document
