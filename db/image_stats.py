"""Aggregate reads of the `images` table for operators and the benchmarks: counts by status,
recent outcomes and the most frequent failure reasons (what `python -m ops status` shows), and
when a set of images finished (what `python -m bench engine` times)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
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


def status_counts_of(conn: psycopg.Connection[Any], ids: Sequence[uuid.UUID]) -> dict[str, int]:
    """How many of `ids` are in each status (statuses with none are absent)."""
    rows = conn.execute(
        "SELECT status, count(*) FROM images WHERE id = ANY(%s) GROUP BY status", (list(ids),)
    ).fetchall()
    return {str(status): int(n) for status, n in rows}


def database_clock(conn: psycopg.Connection[Any]) -> float:
    """PostgreSQL's clock in epoch seconds: the clock of the rows' `updated_at`."""
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    assert row is not None
    return float(row[0])


def last_update(conn: psycopg.Connection[Any], ids: Sequence[uuid.UUID]) -> float | None:
    """When the last of `ids` was committed (its `updated_at`), in epoch seconds; None if none."""
    row = conn.execute(
        "SELECT extract(epoch FROM max(updated_at))::float8 FROM images WHERE id = ANY(%s)",
        (list(ids),),
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])
