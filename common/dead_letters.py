"""Dead-lettered job messages: what RabbitMQ's `x-death` header says of each, and what reason an
image whose job died gets. Read by `ops dlq` and by the worker node's dead-letter reaper."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from common.jobs import JobMessage, MalformedJob


@dataclass(frozen=True)
class DeadLetter:
    """One message held from the dead-letter queue, with what its x-death header says."""

    delivery_tag: int
    body: bytes
    image_id: uuid.UUID | None
    reason: str
    deaths: int
    from_queue: str
    # When the broker dead-lettered it last; None when the header does not say.
    died_at: datetime | None = None

    @property
    def describe_body(self) -> str:
        return str(self.image_id) if self.image_id else f"(malformed) {self.body[:60]!r}"

    @property
    def image_error(self) -> str:
        """The error an unfinished image of this message is failed with."""
        return f"dead-lettered: {self.reason}"

    def dead_for_seconds(self, now: datetime | None = None) -> float:
        """How long ago the broker dead-lettered it (0 when unknown: treated as just now)."""
        if self.died_at is None:
            return 0.0
        return ((now or datetime.now(UTC)) - self.died_at).total_seconds()


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def death_details(headers: dict[str, Any] | None) -> tuple[str, int, str, datetime | None]:
    """(reason, count, queue, time) of the most recent death; ("unknown", 0, "", None) without
    x-death."""
    deaths = (headers or {}).get("x-death") or []
    if not deaths or not isinstance(deaths[0], dict):
        return "unknown", 0, "", None
    latest = deaths[0]
    return (
        _text(latest.get("reason", "unknown")),
        int(latest.get("count", 1) or 1),
        _text(latest.get("queue", "")),
        _aware(latest.get("time")),
    )


def parse_dead_letter(tag: int, properties: pika.BasicProperties, body: bytes) -> DeadLetter:
    try:
        image_id: uuid.UUID | None = JobMessage.decode(body).image_id
    except MalformedJob:
        image_id = None
    reason, deaths, from_queue, died_at = death_details(properties.headers)
    return DeadLetter(tag, body, image_id, reason, deaths, from_queue, died_at)


def take_dead_letters(channel: BlockingChannel, queue: str, limit: int) -> list[DeadLetter]:
    """Up to `limit` messages, held unacknowledged on `channel` (closing it returns them)."""
    letters: list[DeadLetter] = []
    while len(letters) < limit:
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            break
        letters.append(parse_dead_letter(method.delivery_tag, properties, body))
    return letters
