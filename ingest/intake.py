"""Accepting uploads: originals to storage, rows to the database, jobs to the broker.

One request's uploads are one unit of work (`UploadBatch`): everything it stored is removed again
unless its rows were committed and its jobs queued, whatever way the request ends. Each original
is announced in `upload_intents` before it is stored, and the rows' transaction removes the
announcements: a process killed before that leaves them behind for the engine's abandoned-upload
sweeper. A crash after the rows were committed leaves `pending` rows without `enqueued_at`, which
the outbox sweeper publishes again. A request's answer is stored with its rows (same transaction)
when it carries an Idempotency-Key, so a retry gets the same answer even after such a crash.
Images that join a batch (`?batch=`) are inserted only while it is open, checked in the rows'
transaction (see `db.batches.status_for_upload`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import psycopg

from common.broker import JobPublisher
from common.config import QueueSettings
from common.errors import Conflict, DependencyUnavailable, NotFound
from common.jobs import BULK, INTERACTIVE, JobMessage, bulk_shard, choose_lane
from common.storage import ObjectStore, original_key
from db import batches, idempotency, images, upload_intents
from db.batches import BatchRecord
from db.images import ImageRecord, NewImage
from db.pool import Database
from ingest.documents import Accepted, Answer, bulk_answer, single_answer
from ingest.upload_reader import BulkPart, UploadedImage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IdempotencyClaim:
    key: str
    request_hash: str


@dataclass(frozen=True)
class RenditionRequest:
    """The renditions a request asks for: `names` (None: every configured one) out of the
    deployment's `configured` names, which say what an image with no request of its own has."""

    names: tuple[str, ...] | None = None
    configured: tuple[str, ...] = ()

    @property
    def stored_form(self) -> str | None:
        """As the image row keeps it: comma-separated, or None for every configured one."""
        return None if self.names is None else ",".join(self.names)

    def lacking(self, record: ImageRecord) -> tuple[str, ...]:
        """The names asked for that `record` neither has nor is already going to make."""
        covered = (
            {r.name for r in record.stored_renditions}
            if record.status == "completed"
            else set(record.requested or self.configured)
        )
        wanted = self.names if self.names is not None else self.configured
        return tuple(name for name in wanted if name not in covered)

    def widened(self, record: ImageRecord) -> str | None:
        """The record's request with this one's names added, as the row keeps it."""
        if self.names is None or record.requested is None:
            return None  # one of them asks for every configured rendition
        added = [n for n in self.names if n not in record.requested]
        return ",".join((*record.requested, *added))


@dataclass(frozen=True)
class StagedUpload:
    """An upload whose original is on its way to storage; its bytes are no longer held here."""

    new: NewImage
    stored: Future[None]


class _AnsweredMeanwhile(Exception):
    """A concurrent request with the same Idempotency-Key committed first."""


# Originals uploading at once per API process: what bounds the memory a bulk request holds.
MAX_PUTS_IN_FLIGHT = 12
# Expired Idempotency-Key answers are deleted at most this often per API process.
PRUNE_INTERVAL_SECONDS = 600.0
# Image ids are announced in groups that double in size up to this many, so a single upload
# costs one INSERT and a bulk request of n parts about log2(n).
MAX_INTENT_GROUP = 64


class ImageIntake:
    """Turns validated uploads into stored originals, `pending` rows and queued jobs."""

    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        publisher: JobPublisher,
        idempotency_ttl_seconds: int = 24 * 3600,
        lanes: QueueSettings | None = None,
        interactive_fits: Callable[[str, int], bool] | None = None,
    ) -> None:
        self.db = db
        self.store = store
        self.publisher = publisher
        self.ttl = idempotency_ttl_seconds
        # Which lane and bulk shard a request's images get (INTERACTIVE_MAX_PARTS, shards).
        self.lanes = lanes or QueueSettings()
        # Whether an owner's images may take the interactive lane now (and take them from the
        # owner's allowance, INTERACTIVE_IMAGES_PER_MINUTE); without one, they always may.
        self.interactive_fits = interactive_fits or (lambda owner, images: True)
        self._puts = ThreadPoolExecutor(
            max_workers=MAX_PUTS_IN_FLIGHT, thread_name_prefix="intake-put"
        )
        self._put_slots = threading.BoundedSemaphore(MAX_PUTS_IN_FLIGHT)
        self._next_prune = 0.0

    def begin(
        self,
        owner: str,
        renditions: RenditionRequest | None = None,
        batch_id: uuid.UUID | None = None,
    ) -> UploadBatch:
        """A unit of work for one request's uploads (joining the owner's batch `batch_id`, if
        given); use it as a context manager."""
        return UploadBatch(self, owner, renditions or RenditionRequest(), batch_id)

    def put_original(self, new: NewImage, upload: UploadedImage) -> Future[None]:
        """Start storing an original; blocks while MAX_PUTS_IN_FLIGHT originals are uploading,
        so a request with many parts holds only a few of them in memory at once."""
        self._put_slots.acquire()
        try:
            stored = self._puts.submit(
                self.store.put_original, new.original_key, upload.data, upload.content_type
            )
        except BaseException:
            self._put_slots.release()
            raise
        stored.add_done_callback(lambda _: self._put_slots.release())
        return stored

    def owned_batch(self, batch_id: uuid.UUID, owner: str) -> BatchRecord | None:
        """The batch `batch_id` if it is one of the owner's, whatever its status."""
        with self.db.transaction() as conn:
            record = batches.get_batch(conn, batch_id)
        return record if record is not None and record.owner == owner else None

    def replay(self, owner: str, claim: IdempotencyClaim) -> Answer | None:
        """The stored answer for this key; Conflict if the key was used for another request."""
        with self.db.transaction() as conn:
            stored = idempotency.find_answer(conn, owner, claim.key, self.ttl)
        if stored is None:
            return None
        if stored.request_hash != claim.request_hash:
            raise Conflict("this Idempotency-Key was already used for a different request")
        return Answer(stored.status_code, stored.response)

    def prune_expired_answers(self) -> None:
        """Keep `idempotency_keys` from growing: expired answers go, now and then."""
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_INTERVAL_SECONDS
        try:
            with self.db.transaction() as conn:
                removed = idempotency.delete_expired(conn, self.ttl)
        except DependencyUnavailable:
            return
        if removed:
            log.info("removed %d expired idempotency answers", removed)


class UploadBatch:
    """One request's uploads, from the first original stored to the jobs queued.

    A unit of work: leaving the `with` block before `commit` kept the uploads (any exception,
    a replayed answer, a refusal) removes every original it stored and their intents. That is
    the only clean-up path; callers never discard anything themselves.
    """

    def __init__(
        self,
        intake: ImageIntake,
        owner: str,
        renditions: RenditionRequest,
        batch_id: uuid.UUID | None = None,
    ) -> None:
        self._intake = intake
        self._owner = owner
        self._renditions = renditions
        self._batch_id = batch_id
        # Earlier images (de-duplication) sent back to make renditions they lacked.
        self._reopened: list[ImageRecord] = []
        self._staged: list[StagedUpload] = []
        self._unused_ids: list[uuid.UUID] = []
        self._announced: list[uuid.UUID] = []
        self._kept: set[uuid.UUID] = set()

    def __enter__(self) -> UploadBatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Also on BaseException: gunicorn ends a request past its graceful timeout with
        # SystemExit, and the originals must not outlive it.
        self._undo()

    @property
    def staged_count(self) -> int:
        return len(self._staged)

    def stage(self, upload: UploadedImage) -> None:
        """Start storing an original now, while the rest of the request is still being read."""
        image_id = self._next_id()
        new = _new_image(image_id, self._owner, original_key(image_id), upload, self._batch_id)
        new = dataclasses.replace(new, requested_renditions=self._renditions.stored_form)
        self._staged.append(StagedUpload(new, self._intake.put_original(new, upload)))

    def commit(
        self,
        request_id: str,
        parts: Sequence[BulkPart] | None = None,
        *,
        dedupe: bool = False,
        claim: IdempotencyClaim | None = None,
    ) -> Answer:
        """Accept the staged uploads together: one INSERT, one batch of confirmed publishes.

        The answer is the bulk answer for `parts` (one entry per part, the staged ones in
        order), or the single-image answer when `parts` is None. With a claim, an answer stored
        earlier for the same key is returned instead, and nothing of this request is kept.
        """
        self._await_stored()
        if claim is not None:
            replay = self._intake.replay(self._owner, claim)
            if replay is not None:
                return replay
        existing, fresh = self._plan(dedupe)
        fresh = self._in_lane(fresh, None if parts is None else len(self._staged))
        try:
            answer = self._commit_rows(existing, fresh, parts, claim)
        except _AnsweredMeanwhile:
            replay = self._intake.replay(self._owner, claim) if claim else None
            if replay is None:
                raise Conflict("a request with this Idempotency-Key is in progress") from None
            return replay
        self._kept = {s.new.id for s in fresh}
        self._publish(request_id, fresh, claim)
        if claim is not None:
            self._intake.prune_expired_answers()
        return answer

    def _next_id(self) -> uuid.UUID:
        """An image id whose original is already announced in `upload_intents`."""
        if not self._unused_ids:
            size = min(MAX_INTENT_GROUP, max(1, len(self._announced)))
            group = [uuid.uuid4() for _ in range(size)]
            with self._intake.db.transaction() as conn:
                upload_intents.record(conn, group)
            self._announced.extend(group)
            self._unused_ids = group
        return self._unused_ids.pop(0)

    def _await_stored(self) -> None:
        for item in self._staged:
            item.stored.result()

    def _plan(self, dedupe: bool) -> tuple[dict[str, ImageRecord], list[StagedUpload]]:
        """Earlier images to reuse (by digest) and the staged uploads that become new images."""
        if not dedupe or not self._staged:
            return {}, list(self._staged)
        with self._intake.db.transaction() as conn:
            found = images.find_by_digest(
                conn, self._owner, [s.new.sha256 for s in self._staged], self._batch_id
            )
            of_batches = {r.batch_id for r in found.values() if r.batch_id is not None}
            batch_statuses = batches.statuses_of(conn, of_batches)
        existing = {
            digest: record
            for digest, record in found.items()
            if record.batch_id is None
            # A batch deleted meanwhile (retention) took its images with it.
            or self._reusable(record, batch_statuses.get(record.batch_id, "deleted"))
        }
        fresh: list[StagedUpload] = []
        planned: set[str] = set()
        for item in self._staged:
            digest = item.new.sha256
            if digest not in existing and digest not in planned:
                planned.add(digest)
                fresh.append(item)
        return existing, fresh

    def _reusable(self, record: ImageRecord, batch_status: str) -> bool:
        """Whether an earlier copy in a batch may answer this upload. One of an open batch may
        (and is asked for the renditions it lacks), as one of no batch may. One of a batch that
        no longer takes uploads (closed, finished, cancelled) is left as it is: it answers only
        when it is completed with everything asked for, and otherwise a new image is made, since
        reopening it would show a finished batch pending images, or have a cancelled one cancel
        it."""
        if batch_status == "open":
            return True
        return record.status == "completed" and not self._renditions.lacking(record)

    def _in_lane(self, fresh: list[StagedUpload], parts: int | None) -> list[StagedUpload]:
        """`fresh` with the lane of this request (and the owner's bulk shard) set on each image:
        a small request is interactive work while its owner's interactive allowance lasts, and
        bulk work past it."""
        lanes = self._intake.lanes
        lane = choose_lane(parts, lanes.interactive_max_parts)
        if (
            lane == INTERACTIVE
            and fresh
            and not self._intake.interactive_fits(self._owner, len(fresh))
        ):
            lane = BULK
        shard = bulk_shard(self._owner, lanes.bulk_shards) if lane == BULK else 0
        return [
            StagedUpload(dataclasses.replace(s.new, lane=lane, shard=shard), s.stored)
            for s in fresh
        ]

    def _commit_rows(
        self,
        existing: dict[str, ImageRecord],
        fresh: list[StagedUpload],
        parts: Sequence[BulkPart] | None,
        claim: IdempotencyClaim | None,
    ) -> Answer:
        """Insert the rows, release their intents and store the answer, in one transaction."""
        fresh_ids = [s.new.id for s in fresh]
        # The intents of the new rows and of ids never used; de-duplicated copies keep theirs
        # until their originals are removed.
        releasing = [*fresh_ids, *self._unused_ids]
        with self._intake.db.transaction() as conn:
            if releasing and upload_intents.release(conn, releasing) != len(releasing):
                # Swept as abandoned: this request outlived the sweeper's age threshold, and
                # some originals may be gone.
                raise DependencyUnavailable("database", "the upload took too long; send it again")
            if self._batch_id is not None:
                _ensure_batch_open(conn, self._batch_id, self._owner)
            records = images.insert_images(conn, [s.new for s in fresh]) if fresh else []
            existing = self._reopen_lacking(conn, existing)
            answer = self._answer(_accepted(self._staged, existing, records), parts)
            if claim is not None and not idempotency.store_answer(
                conn,
                self._owner,
                claim.key,
                claim.request_hash,
                answer.status_code,
                answer.body,
                self._intake.ttl,
            ):
                raise _AnsweredMeanwhile
        self._unused_ids = []
        return answer

    def _reopen_lacking(
        self, conn: Any, existing: dict[str, ImageRecord]
    ) -> dict[str, ImageRecord]:
        """Earlier copies that lack renditions this request asks for, asked to make them."""
        used = {s.new.sha256 for s in self._staged}
        updated = dict(existing)
        self._reopened = []
        for digest, record in existing.items():
            if digest not in used or not self._renditions.lacking(record):
                continue
            reopened = images.request_renditions(conn, record.id, self._renditions.widened(record))
            if reopened is not None:
                updated[digest] = reopened
                if record.status == "completed":
                    self._reopened.append(record)
        return updated

    @staticmethod
    def _answer(accepted: list[Accepted], parts: Sequence[BulkPart] | None) -> Answer:
        if parts is None:
            [only] = accepted
            return single_answer(only)
        return bulk_answer(parts, accepted)

    def _publish(
        self, request_id: str, fresh: list[StagedUpload], claim: IdempotencyClaim | None
    ) -> None:
        new_ids = [s.new.id for s in fresh]
        jobs = [JobMessage(s.new.id, request_id, s.new.lane, s.new.shard) for s in fresh]
        # Earlier copies asked for renditions they lack travel in their own lane again.
        jobs += [JobMessage(r.id, request_id, r.lane, r.shard) for r in self._reopened]
        queued = [job.image_id for job in jobs]
        if not queued:
            return
        try:
            self._intake.publisher.publish(jobs)
        except Exception:
            # Reopened images stay pending without enqueued_at: the outbox sweeper queues them.
            self._forget(new_ids, claim)
            raise
        _mark_enqueued(self._intake.db, queued)

    def _forget(self, image_ids: list[uuid.UUID], claim: IdempotencyClaim | None) -> None:
        """Take back committed rows whose jobs were not queued; the originals go on exit. If the
        database does not answer, the rows stay and the outbox sweeper queues them later."""
        try:
            with self._intake.db.transaction() as conn:
                images.delete_images(conn, image_ids)
                upload_intents.record(conn, image_ids)
                if claim is not None:
                    idempotency.forget_answer(conn, self._owner, claim.key)
        except DependencyUnavailable:
            log.warning(
                "could not roll back %d images; the outbox sweeper will queue them", len(image_ids)
            )
            return
        self._kept = set()

    def _undo(self) -> None:
        """Remove the originals not kept, then their intents; what cannot be removed now stays
        announced, and the abandoned-upload sweeper removes it later."""
        dropped = [s for s in self._staged if s.new.id not in self._kept]
        for item in dropped:
            # Wait for every put: one still running would otherwise land after the delete.
            # A failed put stored nothing; deleting its key below is harmless.
            with contextlib.suppress(Exception):
                item.stored.result()
        removed = True
        for item in dropped:
            try:
                self._intake.store.delete_original(item.new.original_key)
            except DependencyUnavailable:
                removed = False
        leftover = [*(s.new.id for s in dropped), *self._unused_ids]
        if not removed:
            log.warning("could not remove the originals of %d rejected uploads", len(dropped))
        elif leftover:
            _release_intents(self._intake.db, leftover)
        self._staged, self._unused_ids = [], []


def _accepted(
    staged: Sequence[StagedUpload],
    existing: dict[str, ImageRecord],
    records: Sequence[ImageRecord],
) -> list[Accepted]:
    """Each staged upload's image in request order: its new row, or the earlier copy it matched
    (a digest sent twice in one de-duplicated request maps to the image made for it)."""
    by_id = {r.id: r for r in records}
    made_for_digest = {r.sha256: r for r in reversed(records)}
    accepted = []
    for item in staged:
        record = by_id.get(item.new.id)
        if record is not None:
            accepted.append(Accepted(record, deduplicated=False))
        else:
            digest = item.new.sha256
            reused = existing.get(digest) or made_for_digest[digest]
            accepted.append(Accepted(reused, deduplicated=True))
    return accepted


def _mark_enqueued(db: Database, image_ids: list[uuid.UUID]) -> None:
    try:
        with db.transaction() as conn:
            images.mark_enqueued(conn, image_ids)
    except DependencyUnavailable:
        # The jobs are queued; at worst the sweeper publishes them again and the engine
        # acknowledges the duplicates without work.
        log.warning("%d images queued but not marked enqueued", len(image_ids))


def _release_intents(db: Database, image_ids: list[uuid.UUID]) -> None:
    try:
        with db.transaction() as conn:
            upload_intents.release(conn, image_ids)
    except DependencyUnavailable:
        log.warning("could not release %d upload intents; the sweeper will", len(image_ids))


def _ensure_batch_open(conn: psycopg.Connection[Any], batch_id: uuid.UUID, owner: str) -> None:
    """Images join only an open batch of their owner's; the row stays share-locked until they
    are committed, so a concurrent close or cancel waits for them (and counts them)."""
    status = batches.status_for_upload(conn, batch_id, owner)
    if status is None:
        raise NotFound("no such batch")
    if status != "open":
        raise Conflict(f"the batch is {status}; uploads join only an open batch")


def _new_image(
    image_id: uuid.UUID,
    owner: str,
    key: str,
    upload: UploadedImage,
    batch_id: uuid.UUID | None = None,
) -> NewImage:
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
        batch_id=batch_id,
    )
