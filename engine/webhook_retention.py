"""The webhook retention chore: deletes delivered and abandoned events once they have been settled
for `WEBHOOK_RETENTION_HOURS`, so that `webhook_deliveries` does not grow with every image.

It runs in every worker node, next to the deliverer. Each round deletes in batches of
`batch_size` rows, each its own short transaction (`SKIP LOCKED`: nodes pruning at once take
different rows), and at most `max_batches` of them, so one round never holds locks or a
connection for long however large the backlog.
"""

from __future__ import annotations

import logging

from db import webhook_deliveries
from db.pool import Database
from engine.periodic import PeriodicChore

log = logging.getLogger(__name__)


class WebhookPruner:
    """A daemon thread that deletes settled events older than `retention_hours`."""

    def __init__(
        self,
        db: Database,
        retention_hours: float,
        *,
        interval_seconds: float = 60.0,
        batch_size: int = 1000,
        max_batches: int = 20,
    ) -> None:
        self._db = db
        self._retention_hours = retention_hours
        self._batch_size = batch_size
        self._max_batches = max_batches
        self._chore = PeriodicChore("webhook-pruner", self.prune_once, interval_seconds)

    def start(self) -> None:
        self._chore.start()

    def stop(self) -> None:
        self._chore.stop()

    def prune_once(self) -> int:
        """Delete one round's worth of old settled events; returns how many."""
        deleted = 0
        for _ in range(self._max_batches):
            with self._db.transaction() as conn:
                count = webhook_deliveries.prune_settled(
                    conn, self._retention_hours, self._batch_size
                )
            deleted += count
            if count < self._batch_size:
                break
        if deleted:
            log.info(
                "deleted %d webhook events settled over %g h ago", deleted, self._retention_hours
            )
        return deleted
