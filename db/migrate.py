"""Schema migrations: apply `db/migrations/NNNN_name.sql` in order, each once, recorded in a table.

Safe to run from several processes at once: a transaction-scoped advisory lock serialises them, and
each migration commits together with its record.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg

from common.config import ConfigError, Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Arbitrary constant shared by every pixelmill process: "pxml" in ASCII.
_LOCK_KEY = 0x70786D6C


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in `directory` by version; a malformed or duplicate name is an error."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file {path.name!r} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"two migrations have version {version:04d}")
        found[version] = Migration(version, match.group(2), path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def apply_migrations(conninfo: str, migrations: list[Migration] | None = None) -> list[int]:
    """Apply the pending migrations; returns the versions applied by this call."""
    migrations = discover() if migrations is None else migrations
    applied_now: list[int] = []
    with psycopg.connect(conninfo, autocommit=False) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = conn.execute("SELECT version FROM schema_migrations").fetchall()
        done = {row[0] for row in rows}
        for migration in migrations:
            if migration.version in done:
                continue
            log.info("applying migration %04d_%s", migration.version, migration.name)
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            applied_now.append(migration.version)
        conn.commit()
    return applied_now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelmill-migrate", description=__doc__)
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        applied = apply_migrations(settings.postgres_url)
    except psycopg.OperationalError as exc:
        print(f"cannot reach PostgreSQL at POSTGRES_URL: {exc}", file=sys.stderr)
        return 1
    print(f"migrations applied: {applied or 'none (schema is up to date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
