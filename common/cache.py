"""Redis cache of image status documents. An optimisation only: every failure falls back to
PostgreSQL, and writers invalidate after the database write.

Redis is not trusted to decide who may see an image: each entry carries an HMAC over the image
id and the document, keyed by a secret Redis never sees, so an entry written by anyone else
(or moved to another image's key) reads as a miss.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis

log = logging.getLogger(__name__)


def image_cache_key(prefix: str, image_id: uuid.UUID | str) -> str:
    return f"{prefix}image:{image_id}"


def cache_signing_key(service_secret: str) -> bytes:
    """The HMAC key for cache entries, derived from a secret every API process shares and Redis
    does not hold (the S3 secret key), so no separate secret has to be distributed."""
    return hashlib.sha256(b"pixelmill image cache v1\0" + service_secret.encode()).digest()


def image_done_channel(prefix: str, image_id: uuid.UUID | str) -> str:
    """Pub/sub channel announcing that an image reached a terminal status (for long polls)."""
    return f"{prefix}image-done:{image_id}"


class ImageCache:
    """Status documents by image id, with a TTL; swallows Redis outages (logs them once a while).

    `get` returns only entries `put` by a cache holding the same `signing_key`; processes that
    only invalidate (the engine, ops) need none.
    """

    def __init__(self, client: redis.Redis, prefix: str, signing_key: bytes = b"") -> None:
        self._client = client
        self._prefix = prefix
        self._signing_key = signing_key

    @classmethod
    def from_url(cls, url: str, prefix: str, signing_key: bytes = b"") -> ImageCache:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        return cls(client, prefix, signing_key)

    def get(self, image_id: uuid.UUID) -> dict[str, Any] | None:
        try:
            raw = self._client.get(image_cache_key(self._prefix, image_id))
        except redis.RedisError as exc:
            log.warning("cache read skipped: %s", exc)
            return None
        return None if raw is None else self._verified(image_id, raw)

    def put(self, image_id: uuid.UUID, document: dict[str, Any], ttl_seconds: int) -> None:
        if not self._signing_key:
            return  # an entry no reader could verify is not worth writing
        body = json.dumps(document, separators=(",", ":"), sort_keys=True)
        entry = json.dumps({"mac": self._mac(image_id, body), "document": body})
        try:
            self._client.set(image_cache_key(self._prefix, image_id), entry, ex=ttl_seconds)
        except redis.RedisError as exc:
            log.warning("cache write skipped: %s", exc)

    def _mac(self, image_id: uuid.UUID, body: str) -> str:
        message = f"{image_id}\n{body}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    def _verified(self, image_id: uuid.UUID, raw: bytes | str) -> dict[str, Any] | None:
        """The cached document, or None for an entry this cache did not write for this id."""
        try:
            entry = json.loads(raw)
            body, mac = entry["document"], entry["mac"]
            trusted = (
                bool(self._signing_key)
                and isinstance(body, str)
                and isinstance(mac, str)
                and hmac.compare_digest(mac, self._mac(image_id, body))
            )
            document = json.loads(body) if trusted else None
        except (ValueError, TypeError, KeyError):
            document = None
        if document is None or not isinstance(document, dict):
            log.warning("ignoring a cache entry for image %s that this API did not write", image_id)
            return None
        return document

    def invalidate(self, image_ids: Iterable[uuid.UUID], *, announce: bool = False) -> None:
        """Drop the cached documents in one round trip; with `announce`, also wake the long
        polls waiting for these images."""
        ids = list(image_ids)
        if not ids:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.delete(*(image_cache_key(self._prefix, i) for i in ids))
            if announce:
                for image_id in ids:
                    pipe.publish(image_done_channel(self._prefix, image_id), "done")
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("cache invalidation skipped (entries expire by TTL): %s", exc)

    def wait_for_announcement(
        self, image_id: uuid.UUID, seconds: float, still_waiting: Callable[[], bool]
    ) -> None:
        """Block up to `seconds` until the image is announced done, or `still_waiting()` is
        false once subscribed (the announcement may have come before the subscription).

        Falls back to checking `still_waiting()` every half second when Redis is down.
        """
        deadline = time.monotonic() + seconds
        try:
            with self._client.pubsub(ignore_subscribe_messages=True) as pubsub:
                pubsub.subscribe(image_done_channel(self._prefix, image_id))
                if not still_waiting():
                    return
                while (remaining := deadline - time.monotonic()) > 0:
                    if pubsub.get_message(timeout=min(remaining, 1.0)) is not None:
                        return
            return
        except redis.RedisError as exc:
            log.warning("long poll without Redis, polling the database: %s", exc)
        while time.monotonic() < deadline and still_waiting():
            time.sleep(0.5)

    @property
    def client(self) -> redis.Redis:
        return self._client
