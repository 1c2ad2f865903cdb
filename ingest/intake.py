"""Accepting uploads: originals to storage, rows to the database, jobs to the broker.

The order makes every failure safe. A failure before the broker confirmed the jobs removes what was
written, so a rejected request leaves nothing behind. A crash after the rows were committed leaves
`pending` rows without `enqueued_at`, which the outbox sweeper publishes again. A request's answer
is stored with its rows (same transaction) when it carries an Idempotency-Key, so a retry gets the
same answer even after such a crash.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from common.broker import JobPublisher
from common.errors import Conflict, DependencyUnavailable
from common.jobs import JobMessage
from common.storage import ObjectStore, original_key
from db import idempotency, images
from db.images import ImageRecord, NewImage
from db.pool import Database
from ingest.upload_reader import UploadedImage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """An HTTP answer as stored for idempotent replays."""

    status_code: int
    body: dict[str, Any]


@dataclass(frozen=True)
class IdempotencyClaim:
    key: str
    request_hash: str


@dataclass(frozen=True)
class Accepted:
    """One upload's outcome: its image, and whether it is an earlier copy (de-duplication)."""

    record: ImageRecord
    deduplicated: bool


Render = Callable[[list[Accepted]], Answer]


class _AnsweredMeanwhile(Exception):
    """A concurrent request with the same Idempotency-Key committed first."""


class ImageIntake:
    """Turns validated uploads into stored originals, `pending` rows and queued jobs."""

    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        publisher: JobPublisher,
        idempotency_ttl_seconds: int = 24 * 3600,
    ) -> None:
        self._db = db
        self._store = store
        self._publisher = publisher
        self._ttl = idempotency_ttl_seconds
        self._puts = ThreadPoolExecutor(max_workers=8, thread_name_prefix="intake-put")

    def accept(
        self,
        owner: str,
        uploads: Sequence[UploadedImage],
        request_id: str,
        render: Render,
        *,
        dedupe: bool = False,
        claim: IdempotencyClaim | None = None,
    ) -> Answer:
        """Accept `uploads` together: one INSERT, one batch of confirmed publishes."""
        if claim is not None:
            replay = self.replay(owner, claim)
            if replay is not None:
                return replay
        existing, fresh = self._plan(owner, uploads, dedupe)
        self._store_originals(fresh)
        try:
            answer = self._commit(owner, uploads, existing, fresh, render, claim)
        except _AnsweredMeanwhile:
            self._delete_originals(fresh)
            replay = self.replay(owner, claim) if claim else None
            if replay is None:
                raise Conflict("a request with this Idempotency-Key is in progress") from None
            return replay
        except Exception:
            self._delete_originals(fresh)
            raise
        new_ids = [new.id for new, _ in fresh]
        try:
            self._publisher.publish([JobMessage(i, request_id) for i in new_ids])
        except Exception:
            self._forget(owner, new_ids, fresh, claim)
            raise
        self._mark_enqueued(new_ids)
        return answer

    def replay(self, owner: str, claim: IdempotencyClaim) -> Answer | None:
        """The stored answer for this key; Conflict if the key was used for another request."""
        with self._db.transaction() as conn:
            stored = idempotency.find_answer(conn, owner, claim.key, self._ttl)
        if stored is None:
            return None
        if stored.request_hash != claim.request_hash:
            raise Conflict("this Idempotency-Key was already used for a different request")
        return Answer(stored.status_code, stored.response)

    def _plan(
        self, owner: str, uploads: Sequence[UploadedImage], dedupe: bool
    ) -> tuple[dict[str, ImageRecord], list[tuple[NewImage, UploadedImage]]]:
        """Earlier images to reuse (by digest) and the new images to create."""
        existing: dict[str, ImageRecord] = {}
        if dedupe and uploads:
            with self._db.transaction() as conn:
                existing = images.find_by_digest(conn, owner, [u.sha256 for u in uploads])
        fresh: list[tuple[NewImage, UploadedImage]] = []
        planned: set[str] = set()
        for upload in uploads:
            if dedupe and (upload.sha256 in existing or upload.sha256 in planned):
                continue
            planned.add(upload.sha256)
            image_id = uuid.uuid4()
            fresh.append((_new_image(image_id, owner, original_key(image_id), upload), upload))
        return existing, fresh

    def _commit(
        self,
        owner: str,
        uploads: Sequence[UploadedImage],
        existing: dict[str, ImageRecord],
        fresh: list[tuple[NewImage, UploadedImage]],
        render: Render,
        claim: IdempotencyClaim | None,
    ) -> Answer:
        with self._db.transaction() as conn:
            records = images.insert_images(conn, [n for n, _ in fresh]) if fresh else []
            by_id = {r.id: r for r in records}
            # A digest sent twice in one de-duplicated request maps to the image made for it.
            made_for_digest = {upload.sha256: by_id[new.id] for new, upload in reversed(fresh)}
            accepted = []
            for upload, new in zip(uploads, _aligned(uploads, fresh), strict=True):
                if new is not None:
                    accepted.append(Accepted(by_id[new.id], deduplicated=False))
                else:
                    reused = existing.get(upload.sha256) or made_for_digest[upload.sha256]
                    accepted.append(Accepted(reused, deduplicated=True))
            answer = render(accepted)
            if claim is not None and not idempotency.store_answer(
                conn,
                owner,
                claim.key,
                claim.request_hash,
                answer.status_code,
                answer.body,
                self._ttl,
            ):
                raise _AnsweredMeanwhile
        return answer

    def _store_originals(self, fresh: list[tuple[NewImage, UploadedImage]]) -> None:
        futures = [
            (
                new,
                self._puts.submit(
                    self._store.put_original, new.original_key, upload.data, upload.content_type
                ),
            )
            for new, upload in fresh
        ]
        failed = None
        for _, future in futures:
            try:
                future.result()
            except DependencyUnavailable as exc:
                failed = exc
        if failed is not None:
            self._delete_originals(fresh)
            raise failed

    def _delete_originals(self, fresh: list[tuple[NewImage, UploadedImage]]) -> None:
        for new, _ in fresh:
            try:
                self._store.delete_original(new.original_key)
            except DependencyUnavailable:
                log.warning("could not remove original %s of a rejected upload", new.original_key)

    def _mark_enqueued(self, image_ids: list[uuid.UUID]) -> None:
        if not image_ids:
            return
        try:
            with self._db.transaction() as conn:
                images.mark_enqueued(conn, image_ids)
        except DependencyUnavailable:
            # The jobs are queued; at worst the sweeper publishes them again and the engine
            # acknowledges the duplicates without work.
            log.warning("%d images queued but not marked enqueued", len(image_ids))

    def _forget(
        self,
        owner: str,
        image_ids: list[uuid.UUID],
        fresh: list[tuple[NewImage, UploadedImage]],
        claim: IdempotencyClaim | None,
    ) -> None:
        """Undo accepted-but-unqueued uploads; what cannot be undone now is swept up later."""
        try:
            with self._db.transaction() as conn:
                images.delete_images(conn, image_ids)
                if claim is not None:
                    idempotency.forget_answer(conn, owner, claim.key)
        except DependencyUnavailable:
            log.warning(
                "could not roll back %d images; the outbox sweeper will queue them", len(image_ids)
            )
            return
        self._delete_originals(fresh)


def _aligned(
    uploads: Sequence[UploadedImage], fresh: list[tuple[NewImage, UploadedImage]]
) -> list[NewImage | None]:
    """For each upload, the new image created for it, or None where an existing one is reused."""
    by_upload = {id(upload): new for new, upload in fresh}
    return [by_upload.get(id(upload)) for upload in uploads]


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
