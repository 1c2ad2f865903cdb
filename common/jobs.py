"""The job message: what the API tells the engine about one uploaded image, and which lane (and
bulk shard) it travels in."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass

INTERACTIVE = "interactive"
BULK = "bulk"
LANES = (INTERACTIVE, BULK)


class MalformedJob(ValueError):
    """A message body that is not a pixelmill job; it is dead-lettered, never retried."""


def bulk_shard(owner: str, shards: int) -> int:
    """The bulk shard of `owner`'s work: stable across processes and restarts (not Python's
    salted `hash`), so one owner's images always share one queue and keep their order."""
    digest = hashlib.blake2b(owner.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % max(1, shards)


def choose_lane(parts: int | None, interactive_max_parts: int) -> str:
    """The lane of a request's images: a single upload (`parts` None) or a bulk request of at
    most `interactive_max_parts` images is interactive work; anything larger is bulk."""
    if parts is None or parts <= interactive_max_parts:
        return INTERACTIVE
    return BULK


@dataclass(frozen=True)
class JobMessage:
    image_id: uuid.UUID
    request_id: str = ""
    lane: str = BULK
    shard: int = 0

    def encode(self) -> bytes:
        return json.dumps(
            {
                "image_id": str(self.image_id),
                "request_id": self.request_id,
                "lane": self.lane,
                "shard": self.shard,
            }
        ).encode()

    @classmethod
    def decode(cls, body: bytes) -> JobMessage:
        """A job; messages from before lanes carry none and read as bulk shard 0."""
        try:
            payload = json.loads(body)
            lane = str(payload.get("lane", BULK))
            if lane not in LANES:
                raise ValueError(f"unknown lane {lane!r}")
            return cls(
                uuid.UUID(payload["image_id"]),
                str(payload.get("request_id", "")),
                lane,
                int(payload.get("shard", 0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MalformedJob(f"not a job message: {body[:80]!r}") from exc
