"""Keyset pages of a table newest first, by `(created_at, id)`: what every listing of the API
reads, at the same cost on the last page as on the first."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg.rows import class_row

Row = TypeVar("Row")


def newest_first(
    conn: psycopg.Connection[Any],
    table: str,
    row_type: type[Row],
    *,
    equal: Mapping[str, Any],
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[Row]:
    """Rows of `table` (as `row_type`, whose fields are the columns read) newest first, whose
    columns equal the values in `equal` (a None value filters nothing); `after` is the
    `(created_at, id)` of the previous page's last row. `table` and the column names are the
    caller's constants, never a client's input."""
    clauses = [f"{column} = %s" for column, value in equal.items() if value is not None]
    params: list[Any] = [value for value in equal.values() if value is not None]
    if after is not None:
        clauses.append("(created_at, id) < (%s, %s)")
        params.extend(after)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    columns = ", ".join(row_type.__dataclass_fields__)  # type: ignore[attr-defined]
    with conn.cursor(row_factory=class_row(row_type)) as cur:
        cur.execute(
            f"SELECT {columns} FROM {table} {where} ORDER BY created_at DESC, id DESC LIMIT %s",
            [*params, limit],
        )
        return cur.fetchall()
