"""Throwaway PostgreSQL schemas: a schema of its own for a test session or a benchmark run, and the
connection URL whose search path is that schema, so its tables never meet anyone else's."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

# Plain lower-case names only: the name also travels unquoted inside a connection URL.
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _checked(name: str) -> str:
    if not _SCHEMA_NAME.match(name):
        raise ValueError(f"schema name {name!r} must be lower-case letters, digits and underscores")
    return name


def with_search_path(conninfo: str, schema: str) -> str:
    """`conninfo` (a postgresql:// URL) with `schema` as the search path of every session."""
    separator = "&" if "?" in conninfo else "?"
    return f"{conninfo}{separator}options=-csearch_path%3D{_checked(schema)}"


def create_schema(conninfo: str, name: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(_checked(name))))


def drop_schema(conninfo: str, name: str) -> None:
    """Drop the schema and everything in it; a schema that is not there is fine."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        statement = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
        conn.execute(statement.format(sql.Identifier(_checked(name))))


@contextmanager
def throwaway_schema(conninfo: str, name: str) -> Iterator[str]:
    """A new schema `name` for the duration of the block, dropped with its contents afterwards."""
    create_schema(conninfo, name)
    try:
        yield name
    finally:
        drop_schema(conninfo, name)
