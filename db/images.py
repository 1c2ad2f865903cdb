"""Data access for the `images` table: every SQL statement the API, the engine and the operator
tools run on it (the operator's aggregate reads are in `db.image_stats`)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from db.pages import newest_first

# `cancelled`: its batch was cancelled before the image started (see db.batches).
TERMINAL_STATUSES = ("completed", "failed", "cancelled")
STATUSES = ("pending", "processing", *TERMINAL_STATUSES)


@dataclass(frozen=True)
class StoredRendition:
    """One stored output of an image, as the `renditions` column lists it."""

    name: str
    key: str
    content_type: str
    width: int
    height: int
    # None for results stored before renditions, whose size was not recorded.
    bytes: int | None
    # The CRC-32 of the stored bytes (a batch archive's entries carry it); None for renditions
    # stored before it was recorded (migration 0011).
    crc32: int | None = None

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> StoredRendition:
        size = item.get("bytes")
        crc = item.get("crc32")
        return cls(
            str(item["name"]),
            str(item["key"]),
            str(item["content_type"]),
            int(item["width"]),
            int(item["height"]),
            None if size is None else int(size),
            None if crc is None else int(crc),
        )


@dataclass(frozen=True)
class ImageRecord:
    id: uuid.UUID
    owner: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    source_width: int
    source_height: int
    status: str
    error: str | None
    original_key: str
    result_key: str | None
    result_content_type: str | None
    result_width: int | None
    result_height: int | None
    enqueued_at: datetime | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    # The stored outputs (JSON objects as `StoredRendition` reads them), first rendition first.
    renditions: list[dict[str, Any]]
    # Comma-separated rendition names the upload asked for; None for all configured ones.
    requested_renditions: str | None
    # The lane (and bulk shard) its job travels in: see common.jobs.
    lane: str
    shard: int
    batch_id: uuid.UUID | None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def stored_renditions(self) -> tuple[StoredRendition, ...]:
        return tuple(StoredRendition.from_json(item) for item in self.renditions or ())

    @property
    def requested(self) -> tuple[str, ...] | None:
        """The rendition names asked for, or None for every configured one."""
        if self.requested_renditions is None:
            return None
        return tuple(n for n in self.requested_renditions.split(",") if n)

    @property
    def result_keys(self) -> tuple[str, ...]:
        """Every stored output's key (the main result's included, once)."""
        keys = [r.key for r in self.stored_renditions]
        if self.result_key and self.result_key not in keys:
            keys.insert(0, self.result_key)
        return tuple(keys)


@dataclass(frozen=True)
class NewImage:
    id: uuid.UUID
    owner: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    source_width: int
    source_height: int
    original_key: str
    # Comma-separated rendition names; None for every configured rendition.
    requested_renditions: str | None = None
    lane: str = "bulk"
    shard: int = 0
    batch_id: uuid.UUID | None = None


@dataclass(frozen=True)
class Outcome:
    """The result of processing one image: `completed` with a result, or `failed` with an error."""

    id: uuid.UUID
    status: str
    error: str | None = None
    result_key: str | None = None
    result_content_type: str | None = None
    result_width: int | None = None
    result_height: int | None = None
    # Every output of the image, the main result first (those it had before included).
    renditions: tuple[StoredRendition, ...] = ()
    # The row's `requested_renditions` when it was claimed: if an upload widened it since, the
    # completed image goes back to `pending` for the outbox sweeper to queue again.
    requested_renditions: str | None = None
    result_size_bytes: int | None = None


_COLUMNS = ", ".join(ImageRecord.__dataclass_fields__)


def insert_images(conn: psycopg.Connection[Any], new: Sequence[NewImage]) -> list[ImageRecord]:
    """Insert many images in one statement; rows come back in the order given."""
    columns = list(NewImage.__dataclass_fields__)
    # One array type per NewImage field, in order.
    types = (
        *("uuid", "text", "text", "text", "bigint", "text", "int", "int", "text"),
        *("text", "text", "int", "uuid"),  # requested_renditions, lane, shard, batch_id
    )
    arrays = [[getattr(image, column) for image in new] for column in columns]
    unnest = ", ".join(f"%s::{t}[]" for t in types)
    with conn.cursor(row_factory=class_row(ImageRecord)) as cur:
        cur.execute(
            f"""INSERT INTO images ({", ".join(columns)})
                SELECT * FROM unnest({unnest})
                RETURNING {_COLUMNS}""",
            arrays,
        )
        rows = {row.id: row for row in cur.fetchall()}
    return [rows[image.id] for image in new]


def find_by_digest(
    conn: psycopg.Connection[Any],
    owner: str,
    digests: Sequence[str],
    batch_id: uuid.UUID | None = None,
) -> dict[str, ImageRecord]:
    """The owner's newest image for each digest, leaving out failed and cancelled ones
    (de-duplication); with `batch_id`, only among that batch's images."""
    in_batch = "" if batch_id is None else "AND batch_id = %s"
    params: list[Any] = [owner, list(digests)]
    if batch_id is not None:
        params.append(batch_id)
    with conn.cursor(row_factory=class_row(ImageRecord)) as cur:
        cur.execute(
            f"""SELECT DISTINCT ON (sha256) {_COLUMNS} FROM images
                WHERE owner = %s AND sha256 = ANY(%s) AND status NOT IN ('failed', 'cancelled')
                  {in_batch}
                ORDER BY sha256, created_at DESC""",
            params,
        )
        return {row.sha256: row for row in cur.fetchall()}


def delete_images(conn: psycopg.Connection[Any], ids: Sequence[uuid.UUID]) -> None:
    conn.execute("DELETE FROM images WHERE id = ANY(%s)", (list(ids),))


def delete_terminal(conn: psycopg.Connection[Any], ids: Sequence[uuid.UUID]) -> list[ImageRecord]:
    """Delete the images of `ids` that are terminal (completed, failed, cancelled); returns
    the rows deleted (a reopened or retried image is left as it is)."""
    with conn.cursor(row_factory=class_row(ImageRecord)) as cur:
        cur.execute(
            f"DELETE FROM images WHERE id = ANY(%s) AND status = ANY(%s) RETURNING {_COLUMNS}",
            (list(ids), list(TERMINAL_STATUSES)),
        )
        return cur.fetchall()


def mark_enqueued(conn: psycopg.Connection[Any], ids: Sequence[uuid.UUID]) -> None:
    """Record that the broker confirmed the job messages of `ids` (the outbox marker)."""
    conn.execute(
        "UPDATE images SET enqueued_at = now() WHERE id = ANY(%s) AND enqueued_at IS NULL",
        (list(ids),),
    )


def delete_image(conn: psycopg.Connection[Any], image_id: uuid.UUID) -> ImageRecord | None:
    with conn.cursor(row_factory=class_row(ImageRecord)) as cur:
        cur.execute(f"DELETE FROM images WHERE id = %s RETURNING {_COLUMNS}", (image_id,))
        return cur.fetchone()


def get_image(conn: psycopg.Connection[Any], image_id: uuid.UUID) -> ImageRecord | None:
    with conn.cursor(row_factory=class_row(ImageRecord)) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM images WHERE id = %s", (image_id,))
        return cur.fetchone()


def get_images(conn: psycopg.Connection[Any], ids: Sequence[uuid.UUID]) -> list[ImageRecord]:
    with conn.cursor(row_factory=class_row(ImageRecord)) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM images WHERE id = ANY(%s)", (list(ids),))
        return cur.fetchall()


def list_images(
    conn: psycopg.Connection[Any],
    *,
    owner: str | None,
    status: str | None,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
    batch_id: uuid.UUID | None = None,
) -> list[ImageRecord]:
    """Images newest first; `after` is the (created_at, id) of the last row of the previous page."""
    return newest_first(
        conn,
        "images",
        ImageRecord,
        equal={"batch_id": batch_id, "owner": owner, "status": status},
        limit=limit,
        after=after,
    )


def claim_batch(conn: psycopg.Connection[Any], ids: Sequence[uuid.UUID]) -> list[ImageRecord]:
    """Mark the non-terminal images among `ids` as `processing`, in one statement.

    Images already terminal (a redelivered message), unknown ids (deleted) and images of a
    cancelled batch not yet started are not returned: their messages are acknowledged without
    work. A `pending` image of a cancelled batch becomes `cancelled` here, should the cancel
    have stopped between marking the batch and its images (an API process killed in between).
    (A claimed image of a cancelled batch is in flight: it is claimed again and finishes.)
    """
    with conn.cursor(row_factory=class_row(ImageRecord)) as cur:
        cur.execute(
            f"""WITH of_cancelled AS (
                    UPDATE images SET status = 'cancelled', updated_at = now()
                     WHERE id = ANY(%(ids)s) AND status = 'pending' AND batch_id IS NOT NULL
                       AND EXISTS (SELECT 1 FROM batches AS b
                                    WHERE b.id = images.batch_id
                                      AND b.status IN ('cancelling', 'cancelled'))
                    RETURNING id)
                UPDATE images SET status = 'processing', attempts = attempts + 1, updated_at = now()
                WHERE id = ANY(%(ids)s) AND status IN ('pending', 'processing')
                  AND (batch_id IS NULL OR status = 'processing' OR NOT EXISTS (
                        SELECT 1 FROM batches AS b
                         WHERE b.id = images.batch_id
                           AND b.status IN ('cancelling', 'cancelled')))
                RETURNING {_COLUMNS}""",
            {"ids": list(ids)},
        )
        return cur.fetchall()


def commit_batch(conn: psycopg.Connection[Any], outcomes: Sequence[Outcome]) -> set[uuid.UUID]:
    """Write the terminal status of a whole batch in one statement; returns the ids changed.

    Statuses only move forward: a row already terminal (cancelled included) is left as it is. A
    completed outcome's renditions replace the row's (the engine merges in those the image had);
    a failed one keeps them, and the main result, for an image that had some before (renditions
    added later). An
    image whose requested renditions were widened while it was processed stays `pending`, its
    job to be queued again, so the renditions asked for meanwhile are made too.
    """
    if not outcomes:
        return set()
    cur = conn.execute(
        """UPDATE images AS i
           SET status = CASE WHEN o.status = 'completed'
                              AND i.requested_renditions IS DISTINCT FROM o.requested
                             THEN 'pending' ELSE o.status END,
               enqueued_at = CASE WHEN o.status = 'completed'
                                   AND i.requested_renditions IS DISTINCT FROM o.requested
                                  THEN NULL ELSE i.enqueued_at END,
               error = o.error,
               result_key = COALESCE(o.result_key, i.result_key),
               result_content_type = COALESCE(o.result_content_type, i.result_content_type),
               result_width = COALESCE(o.result_width, i.result_width),
               result_height = COALESCE(o.result_height, i.result_height),
               renditions = CASE WHEN o.status = 'completed' THEN o.renditions
                                 ELSE i.renditions END,
               result_size_bytes = COALESCE(o.result_size_bytes, i.result_size_bytes),
               updated_at = now()
           FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[],
                       %s::int[], %s::int[], %s::jsonb[], %s::text[], %s::bigint[])
                AS o(id, status, error, result_key, result_content_type, result_width,
                     result_height, renditions, requested, result_size_bytes)
           WHERE i.id = o.id AND i.status IN ('pending', 'processing')
           RETURNING i.id""",
        (
            [o.id for o in outcomes],
            [o.status for o in outcomes],
            [o.error for o in outcomes],
            [o.result_key for o in outcomes],
            [o.result_content_type for o in outcomes],
            [o.result_width for o in outcomes],
            [o.result_height for o in outcomes],
            [Jsonb([asdict(r) for r in o.renditions]) for o in outcomes],
            [o.requested_renditions for o in outcomes],
            [o.result_size_bytes for o in outcomes],
        ),
    )
    return {row[0] for row in cur.fetchall()}


def request_renditions(
    conn: psycopg.Connection[Any], image_id: uuid.UUID, names: str | None
) -> ImageRecord | None:
    """Ask for more renditions of an image (`names` comma-separated, None for all configured).

    A completed image goes back to `pending` without `enqueued_at`, for a job to make the ones
    it lacks; a pending or processing one only has its request widened. Failed images are
    never reopened here (de-duplication skips them), nor images of a batch that is no longer
    open (None then: a close or cancel came between the upload's plan and its commit)."""
    with conn.cursor(row_factory=class_row(ImageRecord)) as cur:
        cur.execute(
            f"""UPDATE images SET requested_renditions = %s,
                    status = CASE WHEN status = 'completed' THEN 'pending' ELSE status END,
                    enqueued_at = CASE WHEN status = 'completed' THEN NULL ELSE enqueued_at END,
                    updated_at = now()
                WHERE id = %s AND status <> 'failed'
                  AND (batch_id IS NULL OR EXISTS (SELECT 1 FROM batches AS b
                                                    WHERE b.id = images.batch_id
                                                      AND b.status = 'open'))
                RETURNING {_COLUMNS}""",
            (names, image_id),
        )
        return cur.fetchone()


def statuses_of(conn: psycopg.Connection[Any], ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The current status of each of `ids` that has a row."""
    rows = conn.execute("SELECT id, status FROM images WHERE id = ANY(%s)", (list(ids),))
    return dict(rows.fetchall())


def reset_to_pending(conn: psycopg.Connection[Any], ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """processing/failed -> pending, error cleared and attempts counted afresh (an operator's
    requeue is a new start), before their jobs are published again.

    enqueued_at is cleared too, so the outbox sweeper republishes an image whose message then
    fails to publish (a duplicate message is harmless: claims skip). Returns the ids changed."""
    rows = conn.execute(
        """UPDATE images SET status = 'pending', error = NULL, enqueued_at = NULL,
                             attempts = 0, updated_at = now()
            WHERE id = ANY(%s) AND status IN ('processing', 'failed')
        RETURNING id""",
        (list(ids),),
    ).fetchall()
    return [row[0] for row in rows]


def fail_unfinished(
    conn: psycopg.Connection[Any], errors: Sequence[tuple[uuid.UUID, str]]
) -> list[uuid.UUID]:
    """pending/processing -> failed with the error given for each id; returns the ids changed.

    Images already `completed` or `failed` stay as they are."""
    rows = conn.execute(
        """UPDATE images AS i SET status = 'failed', error = f.error, updated_at = now()
             FROM unnest(%s::uuid[], %s::text[]) AS f(id, error)
            WHERE i.id = f.id AND i.status IN ('pending', 'processing')
        RETURNING i.id""",
        ([image_id for image_id, _ in errors], [error for _, error in errors]),
    ).fetchall()
    return [row[0] for row in rows]


def find_unenqueued(
    conn: psycopg.Connection[Any], older_than_seconds: float, limit: int
) -> list[ImageRecord]:
    """Rows whose job message was never confirmed by the broker (the outbox sweeper's input).

    Locked for the caller's transaction and skipped by concurrent sweepers on other nodes."""
    with conn.cursor(row_factory=class_row(ImageRecord)) as cur:
        cur.execute(
            f"""SELECT {_COLUMNS} FROM images
                WHERE enqueued_at IS NULL AND status = 'pending'
                  AND created_at < now() - make_interval(secs => %s)
                ORDER BY created_at LIMIT %s
                FOR UPDATE SKIP LOCKED""",
            (older_than_seconds, limit),
        )
        return cur.fetchall()


def finished_at(conn: psycopg.Connection[Any], ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, float]:
    """When each terminal image of `ids` was committed (`updated_at`), as epoch seconds on the
    database clock; images not yet terminal are left out."""
    rows = conn.execute(
        """SELECT id, extract(epoch FROM updated_at)::float8 FROM images
            WHERE id = ANY(%s) AND status IN ('completed', 'failed')""",
        (list(ids),),
    ).fetchall()
    return {row[0]: row[1] for row in rows}
