"""Data access for `upload_intents`: the durable note, written before an original is stored, that
its image may end up without a row (so the original can be found and removed if it does)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import psycopg


def record(conn: psycopg.Connection[Any], image_ids: Sequence[uuid.UUID]) -> None:
    """Announce originals about to be stored, all in one statement."""
    conn.execute(
        "INSERT INTO upload_intents (image_id) SELECT unnest(%s::uuid[])", (list(image_ids),)
    )


def release(conn: psycopg.Connection[Any], image_ids: Sequence[uuid.UUID]) -> int:
    """Remove the intents of `image_ids` (their rows exist, or their originals are gone);
    returns how many there were. Waits for a sweeper that holds them."""
    cur = conn.execute("DELETE FROM upload_intents WHERE image_id = ANY(%s)", (list(image_ids),))
    return cur.rowcount


def claim_abandoned(
    conn: psycopg.Connection[Any], older_than_seconds: float, limit: int
) -> list[uuid.UUID]:
    """Image ids announced longer ago than `older_than_seconds`, oldest first.

    Locked for the caller's transaction: a request still committing these rows waits for it, and
    concurrent sweepers on other nodes skip them."""
    rows = conn.execute(
        """SELECT image_id FROM upload_intents
           WHERE created_at < now() - make_interval(secs => %s)
           ORDER BY created_at LIMIT %s
           FOR UPDATE SKIP LOCKED""",
        (older_than_seconds, limit),
    ).fetchall()
    return [row[0] for row in rows]


def without_rows(conn: psycopg.Connection[Any], image_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """The ids among `image_ids` that have no `images` row."""
    rows = conn.execute(
        """SELECT a.id FROM unnest(%s::uuid[]) AS a(id)
           WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.id = a.id)""",
        (list(image_ids),),
    ).fetchall()
    return [row[0] for row in rows]
