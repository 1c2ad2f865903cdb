"""What webhook retention costs: `python -m bench.webhook_retention [--rows 100000]`.

Fills a throwaway schema's `webhook_deliveries` with delivered `image.completed` events (a
realistic body each, settled 200 hours ago), prints the bytes per row with its indexes, the plan
of the retention chore's delete, and how long the chore takes to delete them all. Reads
POSTGRES_URL; the schema is dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid

import psycopg

from common.config import Settings, declare_local
from db.migrate import apply_migrations
from db.pool import Database
from db.schemas import throwaway_schema, with_search_path
from engine.webhook_retention import WebhookPruner


def image_event_body(batch_id: uuid.UUID) -> str:
    stamp = "2026-12-07T23:00:00.123456+00:00"
    data = {
        "id": str(uuid.uuid4()),
        "batch_id": str(batch_id),
        "filename": "IMG_20261207_123456.jpg",
        "status": "completed",
        "error": None,
        "result_key": f"{uuid.uuid4()}.png",
        "created_at": stamp,
        "updated_at": stamp,
    }
    return json.dumps({"type": "image.completed", "timestamp": stamp, "data": data})


def fill(conn: psycopg.Connection[tuple[object, ...]], rows: int) -> int:
    """`rows` delivered events of one batch; returns the body's size."""
    batch_id = uuid.uuid4()
    conn.execute(
        """INSERT INTO batches (id, owner, callback_url, events)
           VALUES (%s, 'bench', 'https://hooks.example.com/hook', '{batch,image}')""",
        (batch_id,),
    )
    body = image_event_body(batch_id)
    conn.execute(
        """INSERT INTO webhook_deliveries
               (batch_id, event_type, image_id, payload, attempts, delivered_at, created_at)
           SELECT %s, 'image.completed', gen_random_uuid(), %s, 1,
                  now() - interval '200 hours', now() - interval '200 hours'
             FROM generate_series(1, %s)""",
        (batch_id, body, rows),
    )
    conn.execute("VACUUM ANALYZE webhook_deliveries")
    return len(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_retention", description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args(argv)
    base = Settings.from_env(declare_local(os.environ)).postgres_url
    with throwaway_schema(base, f"pm_bench_{uuid.uuid4().hex[:8]}") as schema:
        url = with_search_path(base, schema)
        apply_migrations(url)
        with psycopg.connect(url, autocommit=True) as conn:
            body_bytes = fill(conn, args.rows)
            size = conn.execute("SELECT pg_total_relation_size('webhook_deliveries')").fetchone()
            plan = conn.execute(
                """EXPLAIN DELETE FROM webhook_deliveries WHERE id IN (
                       SELECT id FROM webhook_deliveries
                        WHERE coalesce(delivered_at, abandoned_at)
                              < now() - make_interval(secs => 604800.0)
                        LIMIT 1000 FOR UPDATE SKIP LOCKED)"""
            ).fetchall()
        assert size is not None
        print(f"{args.rows} delivered events, body {body_bytes} bytes")
        print(f"table with indexes: {size[0] / args.rows:.0f} bytes per row")
        print("\n".join(f"  {line}" for (line,) in plan))
        db = Database(url)
        try:
            started = time.perf_counter()
            deleted = WebhookPruner(db, 168, max_batches=args.rows).prune_once()
            seconds = time.perf_counter() - started
        finally:
            db.close()
        print(f"deleted {deleted} in {seconds:.2f} s ({seconds / deleted * 1e6:.1f} ms per 1,000)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
