"""Whole-database reads for audits (the chaos benchmark): every image with what it claims to
have stored, batches whose counters disagree with their rows, work not yet settled, and when
the first image completed after a moment. Meant for a database of one run, not for production
tables of millions of rows."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import psycopg

from db.batches import COUNTED_STATUSES
from db.images import TERMINAL_STATUSES


@dataclass(frozen=True)
class AuditedImage:
    """One image row and the objects it says exist: its original and each rendition's key with
    its recorded size (None where none was recorded)."""

    id: uuid.UUID
    owner: str
    filename: str
    status: str
    error: str | None
    batch_id: uuid.UUID | None
    original_key: str
    renditions: tuple[tuple[str, int | None], ...]


def audited_images(conn: psycopg.Connection[Any]) -> list[AuditedImage]:
    rows = conn.execute(
        """SELECT id, owner, filename, status, error, batch_id, original_key,
                  coalesce((SELECT array_agg(r->>'key') FROM jsonb_array_elements(renditions) r),
                           '{}'::text[]),
                  coalesce((SELECT array_agg((r->>'bytes')::bigint)
                              FROM jsonb_array_elements(renditions) r), '{}'::bigint[])
             FROM images"""
    ).fetchall()
    return [
        AuditedImage(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            tuple(zip(row[7], row[8], strict=True)),
        )
        for row in rows
    ]


def batch_counter_mismatches(conn: psycopg.Connection[Any]) -> list[uuid.UUID]:
    """Batches whose counters differ, for any status, from the count of their image rows."""
    counted = ", ".join(
        f"count(*) FILTER (WHERE i.status = '{status}') AS {status}" for status in COUNTED_STATUSES
    )
    differs = " OR ".join(f"b.{s} <> coalesce(c.{s}, 0)" for s in COUNTED_STATUSES)
    rows = conn.execute(
        f"""SELECT b.id FROM batches b
              LEFT JOIN (SELECT i.batch_id, {counted} FROM images i
                          WHERE i.batch_id IS NOT NULL GROUP BY i.batch_id) c
                ON c.batch_id = b.id
             WHERE {differs}"""
    ).fetchall()
    return [row[0] for row in rows]


def unsettled(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """What is still to happen: images not terminal, closed batches not finished, webhook
    deliveries neither delivered nor abandoned, upload intents not released."""
    row = conn.execute(
        """SELECT (SELECT count(*) FROM images WHERE status <> ALL(%s)),
                  (SELECT count(*) FROM batches WHERE status = 'closed'),
                  (SELECT count(*) FROM webhook_deliveries
                    WHERE delivered_at IS NULL AND abandoned_at IS NULL),
                  (SELECT count(*) FROM upload_intents)""",
        (list(TERMINAL_STATUSES),),
    ).fetchone()
    names = ("images", "batches", "webhooks", "upload_intents")
    return dict(zip(names, row or (0, 0, 0, 0), strict=True))


def first_completion_after(conn: psycopg.Connection[Any], moment: float) -> float | None:
    """Epoch seconds (database clock) of the first image completed at or after `moment`."""
    row = conn.execute(
        """SELECT extract(epoch FROM min(updated_at))::float8 FROM images
            WHERE status = 'completed' AND updated_at >= to_timestamp(%s)""",
        (moment,),
    ).fetchone()
    return None if row is None else row[0]
