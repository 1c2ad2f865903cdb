"""Batches: `/api/v1/batches` (create, list), `/api/v1/batches/{id}` (read), its images, and
`close`, `retry` and `cancel`. Counters come from the batch row (kept by triggers), never from
counting images, so reading a batch costs the same at any size. The renditions a batch names
are applied by the upload routes (`ingest/routes/upload.py`) to the images that join it."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import falcon

from common.broker import JobPublisher
from common.cache import ImageCache
from common.config import WebhookSettings
from common.errors import BadRequest, Conflict, NotFound
from common.jobs import JobMessage
from common.renditions import Rendition
from common.webhooks import SecretBox, TargetRefused, check_callback_url, new_secret
from db import batches, images
from db.batches import BatchRecord, NewBatch, batch_document
from db.pool import Database
from ingest.documents import image_document
from ingest.rate_limit import BatchRateLimiter
from ingest.routes.images import MAX_PAGE, decode_cursor, encode_cursor
from ingest.routes.upload import UPLOAD_ROLE, chosen_renditions

# A batch being cancelled or cancelled: no upload, close or retry changes it any more.
CANCELLED = ("cancelling", "cancelled")
MAX_NAME = 200
MAX_URL = 2000
EVENT_CHOICES = (["batch"], ["batch", "image"])


def load_visible(db: Database, batch_id: str, principal: Any) -> BatchRecord:
    """The batch if the principal owns it or is an admin; 404 otherwise, as for unknown ids
    and for a path that cannot name a batch at all (`/batches/None`: no such resource)."""
    try:
        parsed = uuid.UUID(batch_id)
    except ValueError:
        raise NotFound("no such batch") from None
    with db.transaction() as conn:
        record = batches.get_batch(conn, parsed)
    if record is None or not (principal.is_admin or record.owner == principal.subject):
        raise NotFound("no such batch")
    return record


class BatchCollectionResource:
    """Creates a batch (its webhook secret answered once) and lists batches newest first."""

    required_role_post = UPLOAD_ROLE

    def __init__(
        self,
        db: Database,
        webhooks: WebhookSettings,
        renditions: Sequence[Rendition],
        max_open_batches: int = 0,
        limiter: BatchRateLimiter | None = None,
    ) -> None:
        self._db = db
        self._webhooks = webhooks
        self._box = SecretBox(webhooks.encryption_key)
        self._renditions = renditions
        self._max_open = max_open_batches
        self._limiter = limiter

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self._limiter is not None:
            # Charged before the body is read, as uploads are.
            self._limiter.charge(req.context.principal.subject)
        body = req.get_media(default_when_empty={})
        name, callback_url, events, renditions = _creation_fields(body, self._renditions)
        secret = None
        if callback_url is not None:
            try:
                # The literal form only: no DNS in a request. Every delivery resolves the host
                # within its deadline and checks each address.
                check_callback_url(callback_url, self._webhooks)
            except TargetRefused as exc:
                raise BadRequest(str(exc)) from None
            secret = new_secret()
        new = NewBatch(
            id=uuid.uuid4(),
            owner=req.context.principal.subject,
            name=name,
            callback_url=callback_url,
            events=events,
            webhook_secret=None if secret is None else self._box.seal(secret),
            renditions=renditions,
        )
        with self._db.transaction() as conn:
            _ensure_room_for_a_batch(conn, new.owner, self._max_open)
            record = batches.create_batch(conn, new)
        resp.status = falcon.HTTP_201
        resp.location = f"/api/v1/batches/{record.id}"
        resp.media = {**batch_document(record), "webhook_secret": secret}

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        principal = req.context.principal
        limit = req.get_param_as_int("limit", min_value=1, max_value=MAX_PAGE, default=20)
        after = decode_cursor(req.get_param("cursor"))
        owner = req.get_param("owner") if principal.is_admin else str(principal.subject)
        with self._db.transaction() as conn:
            rows = batches.list_batches(conn, owner=owner, limit=limit, after=after)
        next_cursor = (
            encode_cursor(rows[-1].created_at, rows[-1].id) if len(rows) == limit else None
        )
        resp.media = {"items": [batch_document(r) for r in rows], "next_cursor": next_cursor}


def _ensure_room_for_a_batch(conn: Any, owner: str, max_open: int) -> None:
    """Conflict if `owner` already has `max_open` open batches (0: no limit). Closed, finished
    and cancelled batches do not count: closing one makes room."""
    if max_open and batches.count_open_batches(conn, owner) >= max_open:
        raise Conflict(
            f"you have {max_open} open batches, the most allowed (MAX_OPEN_BATCHES_PER_USER); "
            "close or cancel one before creating another"
        )


def _creation_fields(
    body: Any, configured: Sequence[Rendition]
) -> tuple[str | None, str | None, list[str], list[str] | None]:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = set(body) - {"name", "callback_url", "events", "renditions"}
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME):
        raise BadRequest(f"name must be a string of at most {MAX_NAME} characters")
    callback_url = body.get("callback_url")
    if callback_url is not None and (
        not isinstance(callback_url, str) or len(callback_url) > MAX_URL
    ):
        raise BadRequest(f"callback_url must be a URL of at most {MAX_URL} characters")
    events = body.get("events", ["batch"])
    if not isinstance(events, list) or sorted(map(str, events)) not in EVENT_CHOICES:
        raise BadRequest('events must be ["batch"] or ["image", "batch"]')
    return name, callback_url, sorted(events), _renditions_field(body.get("renditions"), configured)


def _renditions_field(value: Any, configured: Sequence[Rendition]) -> list[str] | None:
    """`renditions`: names of configured renditions, each once, kept in configuration order
    (as an upload's `?renditions=` is); absent or null for every configured one."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise BadRequest("renditions must be a list of rendition names")
    return list(chosen_renditions(configured, value))


class BatchResource:
    """One batch's document: status, counters, throughput and ETA."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def on_get(self, req: falcon.Request, resp: falcon.Response, batch_id: str) -> None:
        resp.media = batch_document(load_visible(self._db, batch_id, req.context.principal))


class BatchImagesResource:
    """A batch's images newest first, optionally by status (`?status=failed` says why each)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def on_get(self, req: falcon.Request, resp: falcon.Response, batch_id: str) -> None:
        status = req.get_param("status")
        if status is not None and status not in images.STATUSES:
            raise BadRequest(f"status must be one of {', '.join(images.STATUSES)}")
        limit = req.get_param_as_int("limit", min_value=1, max_value=MAX_PAGE, default=20)
        after = decode_cursor(req.get_param("cursor"))
        record = load_visible(self._db, batch_id, req.context.principal)
        with self._db.transaction() as conn:
            rows = images.list_images(
                conn, owner=None, status=status, limit=limit, after=after, batch_id=record.id
            )
        next_cursor = (
            encode_cursor(rows[-1].created_at, rows[-1].id) if len(rows) == limit else None
        )
        resp.media = {"items": [image_document(r) for r in rows], "next_cursor": next_cursor}


class BatchCloseResource:
    """No more uploads join; the batch finishes when its last image is terminal."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def on_post(self, req: falcon.Request, resp: falcon.Response, batch_id: str) -> None:
        record = load_visible(self._db, batch_id, req.context.principal)
        if record.status in CANCELLED:
            raise Conflict("the batch was cancelled")
        with self._db.transaction() as conn:
            batches.close_batch(conn, record.id)
            closed = batches.get_batch(conn, record.id)
        assert closed is not None
        resp.media = batch_document(closed)


class BatchRetryResource:
    """The batch's failed images go back to `pending`, with a fresh count of attempts, and are
    queued again in the lane and shard stored with each (idempotent)."""

    def __init__(self, db: Database, publisher: JobPublisher, cache: ImageCache) -> None:
        self._db = db
        self._publisher = publisher
        self._cache = cache

    def on_post(self, req: falcon.Request, resp: falcon.Response, batch_id: str) -> None:
        record = load_visible(self._db, batch_id, req.context.principal)
        if record.status in CANCELLED:
            raise Conflict("a cancelled batch cannot be retried")
        with self._db.transaction() as conn:
            requeued = batches.retry_batch(conn, record.id)
        ids = [image.id for image in requeued]
        self._cache.invalidate(ids)
        if requeued:
            # If this publish fails, the rows stay pending without `enqueued_at` and the outbox
            # sweeper queues them.
            self._publisher.publish(
                [JobMessage(i.id, req.context.request_id, i.lane, i.shard) for i in requeued]
            )
            with self._db.transaction() as conn:
                images.mark_enqueued(conn, ids)
        resp.status = falcon.HTTP_202
        resp.media = {"requeued": len(requeued)}


class BatchCancelResource:
    """Images not yet started end `cancelled`; those in flight finish. The batch reads
    `cancelling` until the last of them has, then `cancelled` (and its event is sent)."""

    def __init__(self, db: Database, cache: ImageCache) -> None:
        self._db = db
        self._cache = cache

    def on_post(self, req: falcon.Request, resp: falcon.Response, batch_id: str) -> None:
        record = load_visible(self._db, batch_id, req.context.principal)
        if record.status == "finished":
            raise Conflict("the batch has already finished")
        with self._db.transaction() as conn:
            batches.mark_cancelled(conn, record.id)
        # A second transaction (see mark_cancelled); repeating the cancel finishes its work.
        with self._db.transaction() as conn:
            cancelled = batches.cancel_waiting_images(conn, record.id)
        self._cache.invalidate(cancelled, announce=True)
        resp.status = falcon.HTTP_202
        resp.media = {"cancelled": len(cancelled)}
