"""The job message: what the API tells the engine about one uploaded image."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass


class MalformedJob(ValueError):
    """A message body that is not a pixelmill job; it is dead-lettered, never retried."""


@dataclass(frozen=True)
class JobMessage:
    image_id: uuid.UUID
    request_id: str = ""

    def encode(self) -> bytes:
        return json.dumps({"image_id": str(self.image_id), "request_id": self.request_id}).encode()

    @classmethod
    def decode(cls, body: bytes) -> JobMessage:
        try:
            payload = json.loads(body)
            return cls(uuid.UUID(payload["image_id"]), str(payload.get("request_id", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MalformedJob(f"not a job message: {body[:80]!r}") from exc
