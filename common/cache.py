"""Redis cache of image status documents. An optimisation only: every failure falls back to
PostgreSQL, and writers invalidate after the database write."""

from __future__ import annotations

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


def image_done_channel(prefix: str, image_id: uuid.UUID | str) -> str:
    """Pub/sub channel announcing that an image reached a terminal status (for long polls)."""
    return f"{prefix}image-done:{image_id}"


class ImageCache:
    """Status documents by image id, with a TTL; swallows Redis outages (logs them once a while)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix

    @classmethod
    def from_url(cls, url: str, prefix: str) -> ImageCache:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        return cls(client, prefix)

    def get(self, image_id: uuid.UUID) -> dict[str, Any] | None:
        try:
            raw = self._client.get(image_cache_key(self._prefix, image_id))
        except redis.RedisError as exc:
            log.warning("cache read skipped: %s", exc)
            return None
        return None if raw is None else json.loads(raw)

    def put(self, image_id: uuid.UUID, document: dict[str, Any], ttl_seconds: int) -> None:
        try:
            self._client.set(
                image_cache_key(self._prefix, image_id), json.dumps(document), ex=ttl_seconds
            )
        except redis.RedisError as exc:
            log.warning("cache write skipped: %s", exc)

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
