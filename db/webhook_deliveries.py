"""Data access for `webhook_deliveries`, the durable outbox of batch and image events: rows are
added by the transaction that makes the event happen (see `db.batches` and the triggers of
migration 0007), claimed by the worker nodes' deliverer, marked delivered or retried, and
deleted once settled for the retention time (migration 0010)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row


@dataclass(frozen=True)
class DueCandidate:
    """A due event, not claimed yet: whose it is and where it goes, to choose fairly from."""

    id: uuid.UUID
    owner: str
    callback_url: str | None


@dataclass(frozen=True)
class DueDelivery:
    """One event to send now, with what its sender needs to know about the batch."""

    id: uuid.UUID
    batch_id: uuid.UUID
    owner: str
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


def due_candidates(
    conn: psycopg.Connection[Any], limit: int, skip_owners: list[str]
) -> list[DueCandidate]:
    """The `limit` longest-due events of owners not in `skip_owners` (those with all the
    deliveries in flight they may have), oldest first; nothing is locked or claimed."""
    with conn.cursor(row_factory=class_row(DueCandidate)) as cur:
        cur.execute(
            """SELECT w.id, b.owner, b.callback_url
                 FROM webhook_deliveries AS w JOIN batches AS b ON b.id = w.batch_id
                WHERE w.delivered_at IS NULL AND w.abandoned_at IS NULL
                  AND w.next_attempt_at <= now() AND b.owner <> ALL(%s)
                ORDER BY w.next_attempt_at LIMIT %s""",
            (skip_owners, limit),
        )
        return cur.fetchall()


def claim(
    conn: psycopg.Connection[Any], ids: list[uuid.UUID], lease_seconds: float
) -> list[DueDelivery]:
    """Those of `ids` still due and not being claimed by another node, leased for
    `lease_seconds` (their next attempt moved past the lease) so that other nodes skip them
    while this one sends them outside any transaction."""
    with conn.cursor(row_factory=class_row(DueDelivery)) as cur:
        cur.execute(
            """WITH due AS (
                   SELECT id FROM webhook_deliveries
                    WHERE id = ANY(%s) AND delivered_at IS NULL AND abandoned_at IS NULL
                      AND next_attempt_at <= now()
                    FOR UPDATE SKIP LOCKED)
               UPDATE webhook_deliveries AS w
                  SET next_attempt_at = now() + make_interval(secs => %s),
                      attempts = w.attempts + 1
                 FROM due, batches AS b
                WHERE w.id = due.id AND b.id = w.batch_id
            RETURNING w.id, w.batch_id, b.owner, w.event_type, w.image_id, w.snapshot, w.payload,
                      w.attempts, w.created_at, b.callback_url, b.webhook_secret""",
            (ids, lease_seconds),
        )
        return cur.fetchall()


def prune_settled(conn: psycopg.Connection[Any], older_than_hours: float, limit: int) -> int:
    """Delete up to `limit` events delivered or abandoned more than `older_than_hours` ago
    (the settled index finds them); returns how many."""
    cur = conn.execute(
        """DELETE FROM webhook_deliveries WHERE id IN (
               SELECT id FROM webhook_deliveries
                WHERE coalesce(delivered_at, abandoned_at)
                      < now() - make_interval(secs => %s)
                LIMIT %s FOR UPDATE SKIP LOCKED)""",
        (older_than_hours * 3600, limit),
    )
    return cur.rowcount


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
