"""Per-user allowances of N per minute, kept in Redis (GCRA): the upload rate limit, how many of
a user's images may travel in the interactive lane, and how many batches a user may create.

The generic cell rate algorithm keeps one number per user, the time at which their allowance
would be fully spent again (the "theoretical arrival time"). Each image moves it 60/N seconds
further; a request is refused when that would put it more than a minute ahead of now. So a user
gets N images in any 60-second span, in one burst or spread out, and never 2N across the edge
of a fixed window. A refused request costs nothing. The check and the update are one Lua script
on Redis's own clock, so any number of API processes and machines share one limit.

Fails open: when Redis is down uploads are not limited, because the cache layer is never allowed
to take the upload path down with it.
"""

from __future__ import annotations

import logging
import math

import redis

from common.errors import TooManyRequests

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60

# KEYS[1]: the user's key. ARGV: seconds per image, images to take (0: only check that one more
# would fit), window seconds. Returns "0" when they fit (and takes them), else the seconds to wait.
_GCRA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local interval = tonumber(ARGV[1])
local images = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local ahead = tat + interval * math.max(images, 1) - now
if ahead > window then
    return tostring(ahead - window)
end
if images > 0 then
    local new_tat = tat + interval * images
    redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000))
end
return '0'
"""


class Allowance:
    """One kind of per-user allowance of `per_minute` on its own Redis keys (`kind`)."""

    def __init__(self, client: redis.Redis, prefix: str, kind: str, per_minute: int) -> None:
        self.per_minute = per_minute
        self._key_prefix = f"{prefix}ratelimit:{kind}:"
        self._kind = kind
        self._script = client.register_script(_GCRA)

    def seconds_to_wait(self, subject: str, count: int) -> float:
        """0 when `count` more fit (and are taken; 0 only checks that one more would), else how
        long until they would. Without Redis everything fits (fails open)."""
        interval = WINDOW_SECONDS / self.per_minute
        try:
            return float(
                self._script(
                    keys=[self._key_prefix + subject], args=[interval, count, WINDOW_SECONDS]
                )
            )
        except redis.RedisError as exc:
            log.warning("%s allowance not applied, Redis unavailable: %s", self._kind, exc)
            return 0.0


class UploadRateLimiter:
    def __init__(self, client: redis.Redis, prefix: str, per_minute: int) -> None:
        self._per_minute = per_minute
        self._allowance = Allowance(client, prefix, "upload", per_minute)

    def charge(self, subject: str, images: int = 1) -> None:
        """Take `images` uploads from `subject`'s allowance; raise TooManyRequests (and take
        nothing) when they do not fit."""
        if self._per_minute <= 0:
            return
        if images > self._per_minute:
            raise TooManyRequests(
                f"one request of {images} images is more than the upload limit of "
                f"{self._per_minute} images per minute; send them in smaller requests",
                WINDOW_SECONDS,
            )
        self._run(subject, images)

    def ensure_room(self, subject: str) -> None:
        """Raise TooManyRequests unless one more image would fit now; takes nothing. For a
        request whose image count is known only once its body is read."""
        if self._per_minute > 0:
            self._run(subject, 0)

    def _run(self, subject: str, images: int) -> None:
        wait = self._allowance.seconds_to_wait(subject, images)
        if wait > 0:
            raise TooManyRequests(
                f"upload limit of {self._per_minute} images per minute reached",
                max(1, math.ceil(wait)),
            )


class InteractiveAllowance:
    """How many images a user may send in the interactive lane per minute: a request whose images
    do not fit goes to the bulk lane instead (nothing is refused), so one user's stream of small
    requests cannot take the lane that keeps everyone's single uploads fast."""

    def __init__(self, client: redis.Redis, prefix: str, per_minute: int) -> None:
        self._per_minute = per_minute
        self._allowance = Allowance(client, prefix, "interactive", per_minute)

    def take(self, subject: str, images: int) -> bool:
        """True, and `images` taken from `subject`'s allowance, if they fit; False (nothing
        taken) otherwise. Without Redis every request fits."""
        if self._per_minute <= 0:
            return True
        if images > self._per_minute:
            return False
        return self._allowance.seconds_to_wait(subject, images) <= 0


class BatchRateLimiter:
    """Per-user limit on batch creations (`BATCHES_PER_MINUTE`), the same sliding limit on a key
    of its own: each creation is answered before its body is read."""

    def __init__(self, client: redis.Redis, prefix: str, per_minute: int) -> None:
        self._per_minute = per_minute
        self._allowance = Allowance(client, prefix, "batches", per_minute)

    def charge(self, subject: str) -> None:
        """Take one creation from `subject`'s allowance, or raise TooManyRequests."""
        if self._per_minute <= 0:
            return
        wait = self._allowance.seconds_to_wait(subject, 1)
        if wait > 0:
            raise TooManyRequests(
                f"limit of {self._per_minute} new batches per minute reached",
                max(1, math.ceil(wait)),
            )
