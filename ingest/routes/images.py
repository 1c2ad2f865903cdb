"""Reading, listing and deleting images: `/api/v1/images`, `/api/v1/images/{id}` and
`/api/v1/images/{id}/renditions/{name}`."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime
from typing import Any

import falcon

from common.cache import ImageCache
from common.errors import BadRequest, NotFound
from common.storage import ObjectStore
from db import images
from db.pool import Database
from ingest.documents import image_document

# Non-terminal statuses change under the cache: keep them only briefly so a reader never
# sees an outdated status for long even if an invalidation raced with this write.
PENDING_CACHE_SECONDS = 2
MAX_PAGE = 100
MAX_IDS = 100


def parse_image_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise BadRequest("image id must be a UUID") from None


def visible_to(document: dict[str, Any], principal: Any) -> bool:
    return bool(principal.is_admin or document["owner"] == principal.subject)


class ImageResource:
    """One image: its status document (cached in Redis) and, for admins, its deletion."""

    required_role_delete = "admin"

    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        cache: ImageCache,
        cache_ttl_seconds: int,
        max_wait_seconds: int,
    ) -> None:
        self._db = db
        self._store = store
        self._cache = cache
        self._ttl = cache_ttl_seconds
        self._max_wait = max_wait_seconds

    def on_get(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        parsed = parse_image_id(image_id)
        wait = req.get_param_as_int("wait", min_value=0, max_value=self._max_wait, default=0)
        document = self._cache.get(parsed)
        resp.set_header("X-Cache", "miss" if document is None else "hit")
        if document is None:
            document = self._load(parsed)
        if document is None or not visible_to(document, req.context.principal):
            raise NotFound("no such image")
        if wait and document["status"] not in images.TERMINAL_STATUSES:
            document = self._wait_until_terminal(parsed, wait) or document
        resp.media = self._with_download_url(document)

    def visible_document(self, req: falcon.Request, image_id: uuid.UUID) -> dict[str, Any]:
        """The image's document (cached or loaded); NotFound unless the caller may see it."""
        document = self._cache.get(image_id) or self._load(image_id)
        if document is None or not visible_to(document, req.context.principal):
            raise NotFound("no such image")
        return document

    def _wait_until_terminal(self, image_id: uuid.UUID, seconds: int) -> dict[str, Any] | None:
        """Long poll: woken by the engine's announcement, not by re-reading PostgreSQL."""
        latest: dict[str, Any] | None = None

        def still_waiting() -> bool:
            nonlocal latest
            latest = self._load(image_id)
            return latest is not None and latest["status"] not in images.TERMINAL_STATUSES

        self._cache.wait_for_announcement(image_id, seconds, still_waiting)
        if latest is not None and latest["status"] in images.TERMINAL_STATUSES:
            return latest
        return self._load(image_id)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        parsed = parse_image_id(image_id)
        with self._db.transaction() as conn:
            record = images.delete_image(conn, parsed)
            if record is None:
                raise NotFound("no such image")
            # Inside the transaction: if storage fails, the row stays and the client retries.
            self._store.delete_image_objects(record.original_key, record.result_keys)
        self._cache.invalidate([parsed])
        resp.status = falcon.HTTP_204

    def _load(self, image_id: uuid.UUID) -> dict[str, Any] | None:
        with self._db.transaction() as conn:
            record = images.get_image(conn, image_id)
        if record is None:
            return None
        document = image_document(record)
        self._cache.put(
            image_id, document, self._ttl if record.is_terminal else PENDING_CACHE_SECONDS
        )
        return document

    def _with_download_url(self, document: dict[str, Any]) -> dict[str, Any]:
        """The document with presigned URLs: `download_url` for the main result, `url` for
        each rendition (made per answer, never cached: they expire)."""
        renditions = [
            {**r, "url": self._store.presigned_result_url(r["key"])}
            for r in document.get("renditions", ())
        ]
        result = document.get("result")
        download_url = None
        if result and result.get("key"):
            download_url = self._store.presigned_result_url(result["key"])
        return {**document, "renditions": renditions, "download_url": download_url}


class RenditionResource:
    """One rendition of an image: a redirect to a presigned URL of its stored bytes."""

    def __init__(self, images_resource: ImageResource, store: ObjectStore) -> None:
        self._images = images_resource
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response, image_id: str, name: str) -> None:
        document = self._images.visible_document(req, parse_image_id(image_id))
        for rendition in document.get("renditions", ()):
            if rendition["name"] == name:
                resp.status = falcon.HTTP_302
                resp.location = self._store.presigned_result_url(rendition["key"])
                return
        raise NotFound(f"image has no rendition {name!r}")


class ImageCollectionResource:
    """Lists images newest first with keyset pagination, or fetches many by `?ids=`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        principal = req.context.principal
        # Every parameter is checked, even those `ids` makes moot, so none is silently ignored.
        status = req.get_param("status")
        if status is not None and status not in images.STATUSES:
            raise BadRequest(f"status must be one of {', '.join(images.STATUSES)}")
        limit = req.get_param_as_int("limit", min_value=1, max_value=MAX_PAGE, default=20)
        after = decode_cursor(req.get_param("cursor"))
        ids = req.get_param_as_list("ids")
        if ids is not None:
            # `?ids=a,b` and `?ids=a&ids=b` both work.
            split = [i.strip() for value in ids for i in value.split(",") if i.strip()]
            found = self._by_ids(split, principal)
            resp.media = {"items": [d for d in found if status in (None, d["status"])]}
            return
        owner = self._owner_filter(req, principal)
        with self._db.transaction() as conn:
            rows = images.list_images(conn, owner=owner, status=status, limit=limit, after=after)
        next_cursor = (
            encode_cursor(rows[-1].created_at, rows[-1].id) if len(rows) == limit else None
        )
        resp.media = {"items": [image_document(r) for r in rows], "next_cursor": next_cursor}

    def _owner_filter(self, req: falcon.Request, principal: Any) -> str | None:
        if principal.is_admin:
            return req.get_param("owner")
        return str(principal.subject)

    def _by_ids(self, raw_ids: list[str], principal: Any) -> list[dict[str, Any]]:
        if len(raw_ids) > MAX_IDS:
            raise BadRequest(f"ask for at most {MAX_IDS} ids at once")
        parsed = [parse_image_id(i) for i in raw_ids]
        with self._db.transaction() as conn:
            rows = images.get_images(conn, parsed)
        documents = (image_document(r) for r in rows)
        return [d for d in documents if visible_to(d, principal)]


def encode_cursor(created_at: datetime, image_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{image_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, _, image_id = raw.partition("|")
        return datetime.fromisoformat(stamp), uuid.UUID(image_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("cursor is not one this API returned") from None
