"""Per-user upload rate limit: a fixed one-minute window counted in Redis.

Fails open: when Redis is down uploads are not limited, because the cache layer is never allowed
to take the upload path down with it.
"""

from __future__ import annotations

import logging
import time

import redis

from common.errors import TooManyRequests

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60


class UploadRateLimiter:
    def __init__(self, client: redis.Redis, prefix: str, per_minute: int) -> None:
        self._client = client
        self._prefix = prefix
        self._per_minute = per_minute

    def charge(self, subject: str, images: int = 1) -> None:
        """Count `images` uploads for `subject`; raise TooManyRequests past the limit."""
        if self._per_minute <= 0:
            return
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        key = f"{self._prefix}ratelimit:upload:{subject}:{window}"
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.incrby(key, images)
            pipe.expire(key, WINDOW_SECONDS * 2)
            count = int(pipe.execute()[0])
        except redis.RedisError as exc:
            log.warning("rate limit not applied, Redis unavailable: %s", exc)
            return
        if count > self._per_minute:
            retry_after = max(1, int((window + 1) * WINDOW_SECONDS - now) + 1)
            raise TooManyRequests(
                f"upload limit of {self._per_minute} images per minute reached", retry_after
            )
