"""The JSON documents the API returns for images."""

from __future__ import annotations

from typing import Any

from db.images import ImageRecord


def image_document(record: ImageRecord) -> dict[str, Any]:
    """A client's view of one image; owner included so cached copies can be access-checked."""
    return {
        "id": str(record.id),
        "owner": record.owner,
        "filename": record.filename,
        "status": record.status,
        "error": record.error,
        "content_type": record.content_type,
        "size_bytes": record.size_bytes,
        "sha256": record.sha256,
        "width": record.source_width,
        "height": record.source_height,
        "result": _result_document(record),
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
    }


def _result_document(record: ImageRecord) -> dict[str, Any] | None:
    if record.status != "completed":
        return None
    return {
        "key": record.result_key,
        "content_type": record.result_content_type,
        "width": record.result_width,
        "height": record.result_height,
    }
