"""Data access for `batches`: a bulk job's row, its counters (kept by triggers on `images`, see
`db/migrations/0007_batches.sql`) and the statements that close, cancel and retry it.

The batch document is built here too, because both the API (answers) and the worker nodes
(webhook events) send it.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import class_row

from db.pages import newest_first

# `cancelling`: cancelled while images it had started still run; `cancelled` once none does.
BATCH_STATUSES = ("open", "closed", "finished", "cancelling", "cancelled")
# Nothing more changes in a batch of these (until a retry reopens a finished one).
SETTLED_STATUSES = ("finished", "cancelled")
EVENT_KINDS = ("batch", "image")
COUNTED_STATUSES = ("pending", "processing", "completed", "failed", "cancelled")


@dataclass(frozen=True)
class BatchRecord:
    id: uuid.UUID
    owner: str
    name: str | None
    status: str
    callback_url: str | None
    events: list[str]
    webhook_secret: str | None
    # The renditions its images get unless their upload asks for its own; None: all configured.
    renditions: list[str] | None
    pending: int
    processing: int
    completed: int
    failed: int
    cancelled: int
    bytes_in: int
    bytes_out: int
    created_at: datetime
    closed_at: datetime | None
    finished_at: datetime | None

    @property
    def counts(self) -> dict[str, int]:
        return {status: getattr(self, status) for status in COUNTED_STATUSES}


@dataclass(frozen=True)
class NewBatch:
    id: uuid.UUID
    owner: str
    name: str | None
    callback_url: str | None
    events: list[str]
    webhook_secret: str | None  # encrypted
    renditions: list[str] | None = None


_COLUMNS = ", ".join(BatchRecord.__dataclass_fields__)


def create_batch(conn: psycopg.Connection[Any], new: NewBatch) -> BatchRecord:
    with conn.cursor(row_factory=class_row(BatchRecord)) as cur:
        cur.execute(
            f"""INSERT INTO batches (id, owner, name, callback_url, events, webhook_secret,
                                     renditions)
                VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}""",
            (
                new.id,
                new.owner,
                new.name,
                new.callback_url,
                new.events,
                new.webhook_secret,
                new.renditions,
            ),
        )
        row = cur.fetchone()
    assert row is not None
    return row


def get_batch(conn: psycopg.Connection[Any], batch_id: uuid.UUID) -> BatchRecord | None:
    with conn.cursor(row_factory=class_row(BatchRecord)) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM batches WHERE id = %s", (batch_id,))
        return cur.fetchone()


def list_batches(
    conn: psycopg.Connection[Any],
    *,
    owner: str | None,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[BatchRecord]:
    """Batches newest first; `after` is the (created_at, id) of the previous page's last row."""
    return newest_first(
        conn, "batches", BatchRecord, equal={"owner": owner}, limit=limit, after=after
    )


def status_for_upload(conn: psycopg.Connection[Any], batch_id: uuid.UUID, owner: str) -> str | None:
    """The batch's status, its row locked until the caller's transaction ends, so a close or
    cancel cannot slip between this check and the images joining; None if not the owner's.

    The lock is the one the counters' trigger takes anyway when the rows go in (a weaker share
    lock here would let two uploads each hold one and wait for the other to upgrade)."""
    row = conn.execute(
        "SELECT status FROM batches WHERE id = %s AND owner = %s FOR NO KEY UPDATE",
        (batch_id, owner),
    ).fetchone()
    return None if row is None else str(row[0])


def close_batch(conn: psycopg.Connection[Any], batch_id: uuid.UUID) -> None:
    """open -> closed; a batch whose images are all terminal already finishes now."""
    conn.execute(
        "UPDATE batches SET status = 'closed', closed_at = now() WHERE id = %s AND status = 'open'",
        (batch_id,),
    )
    conn.execute("SELECT finish_batches_if_done(ARRAY[%s]::uuid[])", (batch_id,))


def mark_cancelled(conn: psycopg.Connection[Any], batch_id: uuid.UUID) -> bool:
    """open/closed -> cancelling; False if it was neither. From then on no claim starts one of
    its images, and it becomes `cancelled`, with its `batch.cancelled` event, once none of its
    images is pending or processing (`finish_batches_if_done`, migration 0009).

    Commit this before `cancel_waiting_images`: the images' statement then locks image rows
    before the batch row, in the order a claim does, so a cancel and a claim cannot deadlock."""
    row = conn.execute(
        """UPDATE batches SET status = 'cancelling', closed_at = coalesce(closed_at, now())
            WHERE id = %s AND status IN ('open', 'closed') RETURNING id""",
        (batch_id,),
    ).fetchone()
    return row is not None


def cancel_waiting_images(conn: psycopg.Connection[Any], batch_id: uuid.UUID) -> list[uuid.UUID]:
    """A cancelled batch's `pending` images -> `cancelled` (their messages are acknowledged
    without work); images already claimed finish. A batch with none left running settles now
    (the counters' trigger settles it when its last running image ends). Safe to repeat.
    Returns the images changed."""
    rows = conn.execute(
        """UPDATE images SET status = 'cancelled', updated_at = now()
            WHERE batch_id = %s AND status = 'pending'
              AND EXISTS (SELECT 1 FROM batches
                           WHERE id = %s AND status IN ('cancelling', 'cancelled'))
        RETURNING id""",
        (batch_id, batch_id),
    ).fetchall()
    conn.execute("SELECT finish_batches_if_done(ARRAY[%s]::uuid[])", (batch_id,))
    return [r[0] for r in rows]


@dataclass(frozen=True)
class RequeuedImage:
    """An image a retry sent back to `pending`, with the lane and shard its job travels in."""

    id: uuid.UUID
    lane: str
    shard: int


def retry_batch(conn: psycopg.Connection[Any], batch_id: uuid.UUID) -> list[RequeuedImage]:
    """The batch's `failed` images back to `pending` (error and outbox marker cleared, attempts
    counted afresh: a retry is a new start, whatever used the earlier ones up); a finished
    batch goes back to `closed` and finishes again. Returns the images requeued."""
    with conn.cursor(row_factory=class_row(RequeuedImage)) as cur:
        cur.execute(
            """UPDATE images SET status = 'pending', error = NULL, enqueued_at = NULL,
                                 attempts = 0, updated_at = now()
                WHERE batch_id = %s AND status = 'failed' RETURNING id, lane, shard""",
            (batch_id,),
        )
        requeued = cur.fetchall()
    if requeued:
        conn.execute(
            """UPDATE batches SET status = 'closed', finished_at = NULL
                WHERE id = %s AND status = 'finished'""",
            (batch_id,),
        )
    return requeued


def count_open_batches(conn: psycopg.Connection[Any], owner: str) -> int:
    """How many open batches `owner` has. Serialised per owner until the caller's transaction
    ends, so two creations at once cannot both see room for one more."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('open-batches:' || %s))", (owner,))
    row = conn.execute(
        "SELECT count(*) FROM batches WHERE owner = %s AND status = 'open'", (owner,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def statuses_of(conn: psycopg.Connection[Any], ids: Collection[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The status of each batch of `ids` that exists."""
    if not ids:
        return {}
    rows = conn.execute("SELECT id, status FROM batches WHERE id = ANY(%s)", (list(ids),))
    return {row[0]: str(row[1]) for row in rows.fetchall()}


def record_from_snapshot(snapshot: dict[str, Any]) -> BatchRecord:
    """A batch row as `to_jsonb` wrote it into an event (see migration 0007), as a record."""
    values: dict[str, Any] = {name: snapshot.get(name) for name in BatchRecord.__dataclass_fields__}
    values["id"] = uuid.UUID(str(values["id"]))
    for stamp in ("created_at", "closed_at", "finished_at"):
        if values[stamp] is not None:
            values[stamp] = datetime.fromisoformat(values[stamp])
    return BatchRecord(**values)


def batch_document(record: BatchRecord, now: datetime | None = None) -> dict[str, Any]:
    """A client's view of one batch (the webhook secret is never part of it)."""
    counts = record.counts
    total = sum(counts.values())
    end = record.finished_at or now or datetime.now(UTC)
    elapsed = max((end - record.created_at).total_seconds(), 1e-3)
    done = record.completed + record.failed
    rate = done / elapsed if done else 0.0
    remaining = record.pending + record.processing
    eta: float | None
    if record.status in SETTLED_STATUSES:
        eta = 0.0
    elif remaining == 0:
        eta = 0.0 if record.status == "closed" else None
    else:
        eta = round(remaining / rate, 1) if rate else None
    return {
        "id": str(record.id),
        "owner": record.owner,
        "name": record.name,
        "status": record.status,
        "callback_url": record.callback_url,
        "events": list(record.events),
        "renditions": None if record.renditions is None else list(record.renditions),
        "total": total,
        "counts": counts,
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "created_at": record.created_at.isoformat(),
        "closed_at": _iso(record.closed_at),
        "finished_at": _iso(record.finished_at),
        "images_per_second": round(rate, 3),
        "eta_seconds": eta,
    }


def _iso(stamp: datetime | None) -> str | None:
    return None if stamp is None else stamp.isoformat()
