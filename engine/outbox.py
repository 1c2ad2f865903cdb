"""The outbox sweeper: publishes again the jobs whose upload never got a broker confirm.

An API process that crashed between committing a row and the broker's confirm leaves a `pending`
row with no `enqueued_at`; without this sweeper that image would never be processed.
"""

from __future__ import annotations

import logging

from common.broker import JobPublisher
from common.jobs import JobMessage
from db import images
from db.pool import Database
from engine.periodic import PeriodicChore

log = logging.getLogger(__name__)


class OutboxSweeper:
    """A daemon thread that republishes unconfirmed jobs older than `grace_seconds`."""

    def __init__(
        self,
        db: Database,
        publisher: JobPublisher,
        *,
        interval_seconds: float = 10.0,
        grace_seconds: float = 30.0,
        batch_limit: int = 500,
    ) -> None:
        self._db = db
        self._publisher = publisher
        self._grace = grace_seconds
        self._limit = batch_limit
        self._chore = PeriodicChore("outbox-sweeper", self.sweep_once, interval_seconds)

    def start(self) -> None:
        self._chore.start()

    def stop(self) -> None:
        self._chore.stop()
        self._publisher.close()

    def sweep_once(self) -> int:
        """Publish and mark one round of stranded jobs; returns how many."""
        with self._db.transaction() as conn:
            stranded = images.find_unenqueued(conn, self._grace, self._limit)
            if not stranded:
                return 0
            # Each to its own lane and shard, as stored with the image.
            self._publisher.publish([JobMessage(r.id, "outbox", r.lane, r.shard) for r in stranded])
            images.mark_enqueued(conn, [r.id for r in stranded])
        log.info("outbox sweeper re-published %d stranded jobs", len(stranded))
        return len(stranded)
