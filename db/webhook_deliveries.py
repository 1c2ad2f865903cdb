"""Data access for `webhook_deliveries`, the durable outbox of batch and image events: rows are
added by the transaction that makes the event happen (see `db.batches` and the triggers of
migration 0007), claimed by the worker nodes' deliverer, and marked delivered or retried."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row


@dataclass(frozen=True)
class DueDelivery:
    """One event to send now, with what its sender needs to know about the batch."""

    id: uuid.UUID
    batch_id: uuid.UUID
    event_type: str
    image_id: uuid.UUID | None
    snapshot: dict[str, Any] | None
    payload: str | None
    attempts: int
    created_at: datetime
    callback_url: str | None
    webhook_secret: str | None


@dataclass(frozen=True)
class Backlog:
    """Events not delivered yet, the age of the oldest, and those given up on."""

    undelivered: int
    oldest_age_seconds: float | None
    abandoned: int


def claim_due(conn: psycopg.Connection[Any], limit: int, lease_seconds: float) -> list[DueDelivery]:
    """Due deliveries, leased for `lease_seconds` (their next attempt moved past the lease) so
    that other nodes skip them while this one sends them outside any transaction."""
    with conn.cursor(row_factory=class_row(DueDelivery)) as cur:
        cur.execute(
            """WITH due AS (
                   SELECT id FROM webhook_deliveries
                    WHERE delivered_at IS NULL AND abandoned_at IS NULL
                      AND next_attempt_at <= now()
                    ORDER BY next_attempt_at LIMIT %s
                    FOR UPDATE SKIP LOCKED)
               UPDATE webhook_deliveries AS w
                  SET next_attempt_at = now() + make_interval(secs => %s),
                      attempts = w.attempts + 1
                 FROM due, batches AS b
                WHERE w.id = due.id AND b.id = w.batch_id
            RETURNING w.id, w.batch_id, w.event_type, w.image_id, w.snapshot, w.payload, w.attempts,
                      w.created_at, b.callback_url, b.webhook_secret""",
            (limit, lease_seconds),
        )
        return cur.fetchall()


def save_payload(conn: psycopg.Connection[Any], delivery_id: uuid.UUID, payload: str) -> str:
    """Freeze an event's body at its first attempt; returns the body every attempt sends."""
    row = conn.execute(
        """UPDATE webhook_deliveries SET payload = coalesce(payload, %s) WHERE id = %s
        RETURNING payload""",
        (payload, delivery_id),
    ).fetchone()
    return payload if row is None else str(row[0])


def mark_delivered(conn: psycopg.Connection[Any], delivery_id: uuid.UUID) -> None:
    conn.execute(
        "UPDATE webhook_deliveries SET delivered_at = now(), last_error = NULL WHERE id = %s",
        (delivery_id,),
    )


def schedule_retry(
    conn: psycopg.Connection[Any], delivery_id: uuid.UUID, error: str, delay_seconds: float
) -> None:
    conn.execute(
        """UPDATE webhook_deliveries
              SET last_error = %s, next_attempt_at = now() + make_interval(secs => %s)
            WHERE id = %s""",
        (error[:500], delay_seconds, delivery_id),
    )


def abandon(conn: psycopg.Connection[Any], delivery_id: uuid.UUID, error: str) -> None:
    conn.execute(
        "UPDATE webhook_deliveries SET abandoned_at = now(), last_error = %s WHERE id = %s",
        (error[:500], delivery_id),
    )


def backlog(conn: psycopg.Connection[Any]) -> Backlog:
    """Undelivered events (the partial index keeps this cheap) and the oldest one's age."""
    row = conn.execute(
        """SELECT count(*), extract(epoch FROM now() - min(created_at))::float8
             FROM webhook_deliveries
            WHERE delivered_at IS NULL AND abandoned_at IS NULL"""
    ).fetchone()
    abandoned = conn.execute(
        "SELECT count(*) FROM webhook_deliveries WHERE abandoned_at IS NOT NULL"
    ).fetchone()
    assert row is not None and abandoned is not None
    return Backlog(int(row[0]), row[1], int(abandoned[0]))
