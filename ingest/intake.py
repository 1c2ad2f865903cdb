"""Accepting an upload: original to storage, row to the database, job to the broker.

The order makes every failure safe. A failure before the broker confirmed the job removes what was
written, so a rejected upload leaves nothing behind. A crash after the row was committed leaves a
`pending` row without `enqueued_at`, which the outbox sweeper publishes again.
"""

from __future__ import annotations

import logging
import uuid

from common.broker import JobPublisher
from common.errors import DependencyUnavailable
from common.jobs import JobMessage
from common.storage import ObjectStore, original_key
from db import images
from db.images import ImageRecord, NewImage
from db.pool import Database
from ingest.upload_reader import UploadedImage

log = logging.getLogger(__name__)


class ImageIntake:
    """Turns a validated upload into a stored original, a `pending` row and a queued job."""

    def __init__(self, db: Database, store: ObjectStore, publisher: JobPublisher) -> None:
        self._db = db
        self._store = store
        self._publisher = publisher

    def accept(self, owner: str, upload: UploadedImage, request_id: str) -> ImageRecord:
        image_id = uuid.uuid4()
        key = original_key(image_id)
        self._store.put_original(key, upload.data, upload.content_type)
        try:
            with self._db.transaction() as conn:
                record = images.insert_image(conn, _new_image(image_id, owner, key, upload))
        except Exception:
            self._forget(image_id, key, row_written=False)
            raise
        try:
            self._publisher.publish([JobMessage(image_id, request_id)])
        except Exception:
            self._forget(image_id, key, row_written=True)
            raise
        self._mark_enqueued(image_id)
        return record

    def _mark_enqueued(self, image_id: uuid.UUID) -> None:
        try:
            with self._db.transaction() as conn:
                images.mark_enqueued(conn, [image_id])
        except DependencyUnavailable:
            # The job is queued; at worst the sweeper publishes it again and the engine
            # acknowledges the duplicate without work.
            log.warning("image %s queued but not marked enqueued", image_id)

    def _forget(self, image_id: uuid.UUID, key: str, *, row_written: bool) -> None:
        """Undo a half-accepted upload; what cannot be undone now is swept up later."""
        try:
            if row_written:
                with self._db.transaction() as conn:
                    images.delete_image(conn, image_id)
            self._store.delete_original(key)
        except DependencyUnavailable:
            log.warning("could not roll back image %s; the outbox sweeper will finish it", image_id)


def _new_image(image_id: uuid.UUID, owner: str, key: str, upload: UploadedImage) -> NewImage:
    return NewImage(
        id=image_id,
        owner=owner,
        filename=upload.filename,
        content_type=upload.content_type,
        size_bytes=len(upload.data),
        sha256=upload.sha256,
        source_width=upload.header.width,
        source_height=upload.header.height,
        original_key=key,
    )
