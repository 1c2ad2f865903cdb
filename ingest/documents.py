"""The JSON documents the API returns for images, and the answers to uploads built from them.

Answers are plain data (a status code and a JSON body): they are stored with an upload's rows for
idempotent replays, so nothing here may depend on the HTTP request or response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from db.images import ImageRecord
from ingest.upload_reader import BulkPart


@dataclass(frozen=True)
class Answer:
    """An HTTP answer as plain data, as stored for idempotent replays."""

    status_code: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Accepted:
    """The image an accepted upload stands for: new, or an earlier copy (de-duplication)."""

    record: ImageRecord
    deduplicated: bool


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
        "batch_id": None if record.batch_id is None else str(record.batch_id),
        "renditions": [
            {
                "name": r.name,
                "key": r.key,
                "content_type": r.content_type,
                "width": r.width,
                "height": r.height,
                "bytes": r.bytes,
            }
            for r in record.stored_renditions
        ],
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
    }


def single_answer(accepted: Accepted) -> Answer:
    """`POST /upload`: 201 with the new image, or 200 with the earlier copy it matched."""
    document = {**image_document(accepted.record), "deduplicated": accepted.deduplicated}
    return Answer(200 if accepted.deduplicated else 201, document)


def bulk_answer(parts: Sequence[BulkPart], accepted: Sequence[Accepted]) -> Answer:
    """`POST /uploads`: 207 with per-part entries in request order, refused parts with their
    error, accepted ones with their image (`accepted` holds one entry per part without error)."""
    remaining = iter(accepted)
    items: list[dict[str, object]] = []
    for part in parts:
        if part.error is not None:
            items.append(
                {
                    "index": part.index,
                    "filename": part.filename,
                    "status": part.error.status,
                    "error": {"code": part.error.code, "message": part.error.message},
                }
            )
            continue
        outcome = next(remaining)
        items.append(
            {
                "index": part.index,
                "filename": part.filename,
                "status": 200 if outcome.deduplicated else 201,
                "id": str(outcome.record.id),
                "deduplicated": outcome.deduplicated,
                "image": image_document(outcome.record),
            }
        )
    body = {"items": items, "accepted": len(accepted), "rejected": len(parts) - len(accepted)}
    return Answer(207, body)


def _result_document(record: ImageRecord) -> dict[str, Any] | None:
    if record.status != "completed":
        return None
    return {
        "key": record.result_key,
        "content_type": record.result_content_type,
        "width": record.result_width,
        "height": record.result_height,
    }
