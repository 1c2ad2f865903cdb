"""Accepting uploads: originals to storage, rows to the database, jobs to the broker.

The order makes every failure safe. A failure before the broker confirmed the jobs removes what was
written, so a rejected request leaves nothing behind. A crash after the rows were committed leaves
`pending` rows without `enqueued_at`, which the outbox sweeper publishes again. A request's answer
is stored with its rows (same transaction) when it carries an Idempotency-Key, so a retry gets the
same answer even after such a crash.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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


@dataclass(frozen=True)
class StagedUpload:
    """An upload whose original is on its way to storage; its bytes are no longer held here."""

    new: NewImage
    stored: Future[None]


# Originals uploading at once per API process: what bounds the memory a bulk request holds.
MAX_PUTS_IN_FLIGHT = 12
# Expired Idempotency-Key answers are deleted at most this often per API process.
PRUNE_INTERVAL_SECONDS = 600.0


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
        self._puts = ThreadPoolExecutor(
            max_workers=MAX_PUTS_IN_FLIGHT, thread_name_prefix="intake-put"
        )
        self._put_slots = threading.BoundedSemaphore(MAX_PUTS_IN_FLIGHT)
        self._next_prune = 0.0

    def stage(self, owner: str, upload: UploadedImage) -> StagedUpload:
        """Start storing an original now, while the rest of the request is still being read.

        Blocks while MAX_PUTS_IN_FLIGHT originals are uploading, so a request with many parts
        holds only a few of them in memory at once.
        """
        image_id = uuid.uuid4()
        new = _new_image(image_id, owner, original_key(image_id), upload)
        self._put_slots.acquire()
        try:
            stored = self._puts.submit(
                self._store.put_original, new.original_key, upload.data, upload.content_type
            )
        except BaseException:
            self._put_slots.release()
            raise
        stored.add_done_callback(lambda _: self._put_slots.release())
        return StagedUpload(new, stored)

    def discard(self, staged: Sequence[StagedUpload]) -> None:
        """Remove the originals of uploads that will not be accepted."""
        for item in staged:
            # Wait for every put: one still running would otherwise land after the delete.
            # A failed put stored nothing; deleting its key below is harmless.
            with contextlib.suppress(Exception):
                item.stored.result()
        self._delete_originals([s.new for s in staged])

    def accept(
        self,
        owner: str,
        staged: Sequence[StagedUpload],
        request_id: str,
        render: Render,
        *,
        dedupe: bool = False,
        claim: IdempotencyClaim | None = None,
    ) -> Answer:
        """Accept staged uploads together: one INSERT, one batch of confirmed publishes.

        From here on this method owns the staged originals: every path either records them or
        removes them.
        """
        self._await_stored(staged)
        if claim is not None:
            try:
                replay = self.replay(owner, claim)
            except Exception:
                self.discard(staged)
                raise
            if replay is not None:
                self.discard(staged)
                return replay
        existing, fresh, copies = self._plan(owner, staged, dedupe)
        self._delete_originals([s.new for s in copies])
        try:
            answer = self._commit(owner, staged, existing, fresh, render, claim)
        except _AnsweredMeanwhile:
            self._delete_originals([s.new for s in fresh])
            replay = self.replay(owner, claim) if claim else None
            if replay is None:
                raise Conflict("a request with this Idempotency-Key is in progress") from None
            return replay
        except Exception:
            self._delete_originals([s.new for s in fresh])
            raise
        new_ids = [s.new.id for s in fresh]
        try:
            self._publisher.publish([JobMessage(i, request_id) for i in new_ids])
        except Exception:
            self._forget(owner, new_ids, fresh, claim)
            raise
        self._mark_enqueued(new_ids)
        if claim is not None:
            self._prune_expired_answers()
        return answer

    def _prune_expired_answers(self) -> None:
        """Keep `idempotency_keys` from growing: expired answers go, now and then."""
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_INTERVAL_SECONDS
        try:
            with self._db.transaction() as conn:
                removed = idempotency.delete_expired(conn, self._ttl)
        except DependencyUnavailable:
            return
        if removed:
            log.info("removed %d expired idempotency answers", removed)

    def replay(self, owner: str, claim: IdempotencyClaim) -> Answer | None:
        """The stored answer for this key; Conflict if the key was used for another request."""
        with self._db.transaction() as conn:
            stored = idempotency.find_answer(conn, owner, claim.key, self._ttl)
        if stored is None:
            return None
        if stored.request_hash != claim.request_hash:
            raise Conflict("this Idempotency-Key was already used for a different request")
        return Answer(stored.status_code, stored.response)

    def _await_stored(self, staged: Sequence[StagedUpload]) -> None:
        failed: Exception | None = None
        for item in staged:
            try:
                item.stored.result()
            except Exception as exc:
                failed = exc
        if failed is not None:
            self._delete_originals([s.new for s in staged])
            raise failed

    def _plan(
        self, owner: str, staged: Sequence[StagedUpload], dedupe: bool
    ) -> tuple[dict[str, ImageRecord], list[StagedUpload], list[StagedUpload]]:
        """Earlier images to reuse (by digest), the new images to create, and the staged copies
        that de-duplication makes unnecessary."""
        if not dedupe:
            return {}, list(staged), []
        existing: dict[str, ImageRecord] = {}
        if staged:
            with self._db.transaction() as conn:
                existing = images.find_by_digest(conn, owner, [s.new.sha256 for s in staged])
        fresh: list[StagedUpload] = []
        copies: list[StagedUpload] = []
        planned: set[str] = set()
        for item in staged:
            digest = item.new.sha256
            if digest in existing or digest in planned:
                copies.append(item)
            else:
                planned.add(digest)
                fresh.append(item)
        return existing, fresh, copies

    def _commit(
        self,
        owner: str,
        staged: Sequence[StagedUpload],
        existing: dict[str, ImageRecord],
        fresh: list[StagedUpload],
        render: Render,
        claim: IdempotencyClaim | None,
    ) -> Answer:
        fresh_ids = {s.new.id for s in fresh}
        with self._db.transaction() as conn:
            records = images.insert_images(conn, [s.new for s in fresh]) if fresh else []
            by_id = {r.id: r for r in records}
            # A digest sent twice in one de-duplicated request maps to the image made for it.
            made_for_digest = {s.new.sha256: by_id[s.new.id] for s in reversed(fresh)}
            accepted = []
            for item in staged:
                if item.new.id in fresh_ids:
                    accepted.append(Accepted(by_id[item.new.id], deduplicated=False))
                else:
                    digest = item.new.sha256
                    reused = existing.get(digest) or made_for_digest[digest]
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

    def _delete_originals(self, news: Sequence[NewImage]) -> None:
        for new in news:
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
        fresh: list[StagedUpload],
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
        self._delete_originals([s.new for s in fresh])


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
