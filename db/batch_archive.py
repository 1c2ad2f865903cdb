"""The reads a batch's archive makes, a page at a time: its completed images in archive order
(by the name group of `db/migrations/0011_batch_archives.sql`, then id) and its failed ones
oldest first, plus the write that keeps a rendition's CRC-32 once it had to be computed."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row

from db.images import StoredRendition


@dataclass(frozen=True)
class ArchivedImage:
    """A completed image as the archive names it: `stem` and `name_group` as the migration's
    `archive_stem` and `archive_group` compute them from the filename."""

    id: uuid.UUID
    stem: str
    name_group: str
    updated_at: datetime
    renditions: list[dict[str, Any]]

    @property
    def stored_renditions(self) -> tuple[StoredRendition, ...]:
        return tuple(StoredRendition.from_json(item) for item in self.renditions or ())


@dataclass(frozen=True)
class FailedImage:
    id: uuid.UUID
    filename: str
    error: str | None
    created_at: datetime


def completed_page(
    conn: psycopg.Connection[Any],
    batch_id: uuid.UUID,
    *,
    after: tuple[str, uuid.UUID] | None,
    limit: int,
) -> list[ArchivedImage]:
    """The next `limit` completed images after `after`, a previous row's (name_group, id)."""
    keyset = ""
    params: list[Any] = [batch_id]
    if after is not None:
        keyset = """AND (archive_group(filename) COLLATE "C", id) > (%s, %s)"""
        params.extend(after)
    with conn.cursor(row_factory=class_row(ArchivedImage)) as cur:
        cur.execute(
            f"""SELECT id, archive_stem(filename) AS stem,
                       archive_group(filename) COLLATE "C" AS name_group, updated_at, renditions
                  FROM images
                 WHERE batch_id = %s AND status = 'completed' {keyset}
                 ORDER BY archive_group(filename) COLLATE "C", id
                 LIMIT %s""",
            [*params, limit],
        )
        return cur.fetchall()


def failed_page(
    conn: psycopg.Connection[Any],
    batch_id: uuid.UUID,
    *,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[FailedImage]:
    """The next `limit` failed images oldest first after `after`, a previous row's
    (created_at, id)."""
    keyset = ""
    params: list[Any] = [batch_id]
    if after is not None:
        keyset = "AND (created_at, id) > (%s, %s)"
        params.extend(after)
    with conn.cursor(row_factory=class_row(FailedImage)) as cur:
        cur.execute(
            f"""SELECT id, filename, error, created_at FROM images
                 WHERE batch_id = %s AND status = 'failed' {keyset}
                 ORDER BY created_at, id
                 LIMIT %s""",
            [*params, limit],
        )
        return cur.fetchall()


def record_checksum(
    conn: psycopg.Connection[Any], image_id: uuid.UUID, key: str, crc32: int, size: int
) -> None:
    """Keep the CRC-32 and size computed for the rendition stored at `key`, so the next archive
    need not read it. Neither the status nor `updated_at` changes: the bytes are the same."""
    conn.execute(
        """UPDATE images
              SET renditions = coalesce((
                  SELECT jsonb_agg(CASE WHEN r ->> 'key' = %s
                                        THEN r || jsonb_build_object('crc32', %s::bigint,
                                                                     'bytes', %s::bigint)
                                        ELSE r END ORDER BY position)
                    FROM jsonb_array_elements(renditions) WITH ORDINALITY AS t(r, position)),
                  renditions)
            WHERE id = %s AND status = 'completed'""",
        (key, crc32, size, image_id),
    )
