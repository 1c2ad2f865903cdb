"""Redis cache of image status documents. An optimisation only: every failure falls back to
PostgreSQL, and writers invalidate after the database write."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from typing import Any

import redis

log = logging.getLogger(__name__)


def image_cache_key(prefix: str, image_id: uuid.UUID | str) -> str:
    return f"{prefix}image:{image_id}"


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

    def invalidate(self, image_ids: Iterable[uuid.UUID]) -> None:
        keys = [image_cache_key(self._prefix, i) for i in image_ids]
        if not keys:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.delete(*keys)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("cache invalidation skipped (entries expire by TTL): %s", exc)

    @property
    def client(self) -> redis.Redis:
        return self._client
