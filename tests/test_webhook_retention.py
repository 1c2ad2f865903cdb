"""Webhook events do not pile up: a worker node's retention chore deletes those delivered or
abandoned more than `WEBHOOK_RETENTION_HOURS` ago, in bounded batches, and keeps every event
still to be sent and every recently settled one."""

from __future__ import annotations

from typing import Any

import psycopg

from common.config import Settings
from db.pool import Database
from engine.webhook_retention import WebhookPruner
from tests.support import api_for, close_batch, create_batch


def events_aged(settings: Settings, issuer: Any, user_id: str, ages: dict[str, str]) -> None:
    """One `batch.finished` event per entry, named by its batch's name, settled as given:
    `ages[name]` is an SQL assignment list such as "delivered_at = now() - interval '200 h'"."""
    with api_for(settings, issuer.mint_token(user_id)) as api:
        for name in ages:
            batch = create_batch(api, name=name, callback_url="http://127.0.0.1:9/hook")
            close_batch(api, batch["id"])
    with psycopg.connect(settings.postgres_url) as conn:
        for name, assignments in ages.items():
            conn.execute(
                f"""UPDATE webhook_deliveries AS w SET {assignments}
                      FROM batches AS b WHERE b.id = w.batch_id AND b.name = %s""",
                (name,),
            )


def remaining(settings: Settings) -> list[str]:
    with psycopg.connect(settings.postgres_url) as conn:
        rows = conn.execute(
            """SELECT b.name FROM webhook_deliveries AS w JOIN batches AS b ON b.id = w.batch_id
                ORDER BY b.name"""
        ).fetchall()
    return [name for (name,) in rows]


def test_events_settled_past_the_retention_are_deleted_and_the_rest_kept(
    own_database: Settings, issuer: Any, user_id: str
) -> None:
    old = "now() - interval '200 hours'"
    events_aged(
        own_database,
        issuer,
        user_id,
        {
            "delivered-old": f"delivered_at = {old}, created_at = {old}",
            "abandoned-old": f"abandoned_at = {old}, created_at = {old}",
            "delivered-young": "delivered_at = now() - interval '1 hour'",
            # Undelivered, however old, is never the chore's to delete.
            "pending-old": f"created_at = {old}, next_attempt_at = now() + interval '1 hour'",
            "pending-new": "next_attempt_at = now() + interval '1 hour'",
        },
    )
    db = Database(own_database.postgres_url)
    try:
        assert WebhookPruner(db, retention_hours=168).prune_once() == 2
        assert WebhookPruner(db, retention_hours=168).prune_once() == 0
    finally:
        db.close()
    assert remaining(own_database) == ["delivered-young", "pending-new", "pending-old"]


def test_a_round_deletes_in_bounded_batches_and_the_next_round_goes_on(
    own_database: Settings, issuer: Any, user_id: str
) -> None:
    old = "delivered_at = now() - interval '200 hours'"
    events_aged(own_database, issuer, user_id, {f"old-{i}": old for i in range(7)})
    db = Database(own_database.postgres_url)
    try:
        pruner = WebhookPruner(db, retention_hours=168, batch_size=2, max_batches=2)
        assert [pruner.prune_once() for _ in range(3)] == [4, 3, 0]
    finally:
        db.close()
    assert remaining(own_database) == []
