"""Connection pooling for PostgreSQL, with outages reported as `DependencyUnavailable`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from common.errors import DependencyUnavailable

DEPENDENCY = "database"


class Database:
    """A small pool of connections; create it in the process that uses it (after fork).

    `transaction()` yields a connection inside a transaction that commits on success and rolls
    back on error; `one_statement()` yields one for a single statement, which is a transaction by
    itself. A lost connection is discarded by the pool and replaced on next use.
    """

    def __init__(self, conninfo: str, *, min_size: int = 1, max_size: int = 8) -> None:
        self._pool = ConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            timeout=5.0,
            open=False,
            check=ConnectionPool.check_connection,
            # Autocommit: `transaction()` opens its block with BEGIN as it would otherwise, and
            # `one_statement()` needs no BEGIN and COMMIT round trips of its own.
            kwargs={"connect_timeout": 3, "autocommit": True},
            # The pool doubles its delay between reconnection attempts for this long, so after
            # an outage of minutes it would notice the server's return minutes late; past it, the
            # next request that finds no connection makes a fresh attempt at once.
            reconnect_timeout=10.0,
        )
        self._pool.open(wait=False)

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise DependencyUnavailable(DEPENDENCY) from exc

    @contextmanager
    def one_statement(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection for exactly one statement, committed as it runs: one round trip where a
        transaction takes three (BEGIN, the statement, COMMIT). On a busy node each round trip
        waits for the database and the node to be scheduled, so this is what the per-batch
        claim and commit use. Two statements here would not be atomic: use `transaction()`."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise DependencyUnavailable(DEPENDENCY) from exc

    def check(self) -> None:
        with self.transaction() as conn:
            ping(conn)

    def close(self) -> None:
        self._pool.close()


def ping(conn: psycopg.Connection[Any]) -> None:
    """One round trip that needs no table: the server accepts and answers queries."""
    conn.execute("SELECT 1")
