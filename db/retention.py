"""Data access for retention: which rows have outlived BATCH_RETENTION_DAYS or
IMAGE_RETENTION_DAYS, and the `expired_objects` outbox through which their objects leave storage
(see `engine/retention.py` and migration 0009)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import class_row

from db import images
from db.images import ImageRecord

ORIGINALS = "originals"
RESULTS = "results"
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class ExpiredObject:
    """An object whose row is gone: `bucket` is ORIGINALS or RESULTS."""

    bucket: str
    key: str
    image_id: uuid.UUID


def expired_batch_images(conn: psycopg.Connection[Any], days: float, limit: int) -> list[uuid.UUID]:
    """Up to `limit` terminal images of batches settled (finished or cancelled) more than `days`
    ago, locked for the caller's transaction and skipped by other nodes' sweepers. (A batch
    cancelled before `cancelling` existed may still have had images running when it read
    `cancelled`: those wait until they end.)"""
    rows = conn.execute(
        """SELECT i.id FROM batches AS b JOIN images AS i ON i.batch_id = b.id
            WHERE b.status IN ('finished', 'cancelled')
              AND b.finished_at < now() - make_interval(secs => %s)
              AND i.status IN ('completed', 'failed', 'cancelled')
            LIMIT %s FOR UPDATE OF i SKIP LOCKED""",
        (days * SECONDS_PER_DAY, limit),
    ).fetchall()
    return [row[0] for row in rows]


def expired_loose_images(conn: psycopg.Connection[Any], days: float, limit: int) -> list[uuid.UUID]:
    """Up to `limit` terminal images of no batch last changed more than `days` ago, locked as
    `expired_batch_images` locks them."""
    rows = conn.execute(
        """SELECT id FROM images
            WHERE batch_id IS NULL AND status IN ('completed', 'failed', 'cancelled')
              AND updated_at < now() - make_interval(secs => %s)
            ORDER BY updated_at LIMIT %s FOR UPDATE SKIP LOCKED""",
        (days * SECONDS_PER_DAY, limit),
    ).fetchall()
    return [row[0] for row in rows]


def delete_expired_images(
    conn: psycopg.Connection[Any], ids: Sequence[uuid.UUID]
) -> list[ImageRecord]:
    """Delete the rows of `ids` still terminal and record every object they had (the original,
    each rendition) in `expired_objects`, in the caller's transaction. Returns the rows."""
    deleted = images.delete_terminal(conn, ids)
    objects = [
        ExpiredObject(bucket, key, record.id)
        for record in deleted
        for bucket, key in (
            (ORIGINALS, record.original_key),
            *((RESULTS, key) for key in record.result_keys),
        )
    ]
    if objects:
        conn.execute(
            """INSERT INTO expired_objects (bucket, key, image_id)
               SELECT * FROM unnest(%s::text[], %s::text[], %s::uuid[])
               ON CONFLICT DO NOTHING""",
            (
                [o.bucket for o in objects],
                [o.key for o in objects],
                [o.image_id for o in objects],
            ),
        )
    return deleted


def claim_expired_objects(conn: psycopg.Connection[Any], limit: int) -> list[ExpiredObject]:
    """Up to `limit` objects still to remove, locked for the caller's transaction."""
    with conn.cursor(row_factory=class_row(ExpiredObject)) as cur:
        cur.execute(
            """SELECT bucket, key, image_id FROM expired_objects
                ORDER BY expired_at LIMIT %s FOR UPDATE SKIP LOCKED""",
            (limit,),
        )
        return cur.fetchall()


def forget_expired_objects(conn: psycopg.Connection[Any], objects: Sequence[ExpiredObject]) -> None:
    """The objects are gone from storage: their records go too."""
    conn.execute(
        """DELETE FROM expired_objects AS e
            USING unnest(%s::text[], %s::text[]) AS gone(bucket, key)
            WHERE e.bucket = gone.bucket AND e.key = gone.key""",
        ([o.bucket for o in objects], [o.key for o in objects]),
    )


def delete_empty_expired_batches(
    conn: psycopg.Connection[Any], days: float, limit: int
) -> list[uuid.UUID]:
    """Delete up to `limit` batches settled more than `days` ago that have no image left and no
    webhook event still to deliver, with their delivered or abandoned events. Returns them."""
    rows = conn.execute(
        """SELECT b.id FROM batches AS b
            WHERE b.status IN ('finished', 'cancelled')
              AND b.finished_at < now() - make_interval(secs => %s)
              AND NOT EXISTS (SELECT 1 FROM images AS i WHERE i.batch_id = b.id)
              AND NOT EXISTS (SELECT 1 FROM webhook_deliveries AS w
                               WHERE w.batch_id = b.id
                                 AND w.delivered_at IS NULL AND w.abandoned_at IS NULL)
            LIMIT %s FOR UPDATE SKIP LOCKED""",
        (days * SECONDS_PER_DAY, limit),
    ).fetchall()
    ids = [row[0] for row in rows]
    if ids:
        conn.execute("DELETE FROM webhook_deliveries WHERE batch_id = ANY(%s)", (ids,))
        conn.execute("DELETE FROM batches WHERE id = ANY(%s)", (ids,))
    return ids
