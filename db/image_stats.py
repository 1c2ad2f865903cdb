"""Aggregate reads of the `images` table for operators: counts by status, recent outcomes and
the most frequent failure reasons (what `python -m ops status` shows)."""

from __future__ import annotations

from typing import Any

import psycopg

from db.images import STATUSES


def recent_outcomes(conn: psycopg.Connection[Any], window_seconds: float) -> tuple[int, int]:
    """(completed, failed): images in those statuses last updated within `window_seconds`."""
    row = conn.execute(
        """SELECT count(*) FILTER (WHERE status = 'completed'),
                  count(*) FILTER (WHERE status = 'failed')
             FROM images
            WHERE status IN ('completed', 'failed')
              AND updated_at > now() - make_interval(secs => %s)""",
        (window_seconds,),
    ).fetchone()
    return (row[0], row[1]) if row is not None else (0, 0)


def top_failure_reasons(
    conn: psycopg.Connection[Any], within: str, limit: int
) -> list[tuple[str, int]]:
    """(error, count) of images failed within `within` (a PostgreSQL interval such as "1 hour"),
    most frequent first; a failure without an error counts as "(none)"."""
    rows = conn.execute(
        """SELECT coalesce(error, '(none)'), count(*) FROM images
            WHERE status = 'failed' AND updated_at > now() - %s::interval
            GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT %s""",
        (within, limit),
    ).fetchall()
    return [(reason, count) for reason, count in rows]


def count_by_status(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Images per status, every status present (zero when none)."""
    counts = dict.fromkeys(STATUSES, 0)
    for status, count in conn.execute("SELECT status, count(*) FROM images GROUP BY status"):
        counts[status] = count
    return counts
