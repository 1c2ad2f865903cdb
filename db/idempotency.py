"""Data access for `idempotency_keys`: the stored first answer of a request, per owner and key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb


@dataclass(frozen=True)
class StoredAnswer:
    request_hash: str
    status_code: int
    response: dict[str, Any]


def find_answer(
    conn: psycopg.Connection[Any], owner: str, key: str, ttl_seconds: int
) -> StoredAnswer | None:
    """The answer stored for (owner, key) unless it is older than `ttl_seconds`."""
    row = conn.execute(
        """SELECT request_hash, status_code, response FROM idempotency_keys
           WHERE owner = %s AND key = %s AND created_at > now() - make_interval(secs => %s)""",
        (owner, key, ttl_seconds),
    ).fetchone()
    return None if row is None else StoredAnswer(row[0], row[1], row[2])


def store_answer(
    conn: psycopg.Connection[Any],
    owner: str,
    key: str,
    request_hash: str,
    status_code: int,
    response: dict[str, Any],
    ttl_seconds: int,
) -> bool:
    """Record the answer; False when another request stored one for this key first.

    An expired entry is replaced. A concurrent request with the same key waits on the row lock
    until the first transaction ends, then sees its answer.
    """
    conn.execute(
        """DELETE FROM idempotency_keys
           WHERE owner = %s AND key = %s AND created_at <= now() - make_interval(secs => %s)""",
        (owner, key, ttl_seconds),
    )
    cur = conn.execute(
        """INSERT INTO idempotency_keys (owner, key, request_hash, status_code, response)
           VALUES (%s, %s, %s, %s, %s) ON CONFLICT (owner, key) DO NOTHING""",
        (owner, key, request_hash, status_code, Jsonb(response)),
    )
    return cur.rowcount == 1


def forget_answer(conn: psycopg.Connection[Any], owner: str, key: str) -> None:
    conn.execute("DELETE FROM idempotency_keys WHERE owner = %s AND key = %s", (owner, key))


def delete_expired(conn: psycopg.Connection[Any], ttl_seconds: int) -> int:
    cur = conn.execute(
        "DELETE FROM idempotency_keys WHERE created_at <= now() - make_interval(secs => %s)",
        (ttl_seconds,),
    )
    return cur.rowcount
