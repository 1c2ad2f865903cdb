"""The abandoned-upload sweeper: removes originals whose upload request died before their rows.

The API announces each original in `upload_intents` before storing it and releases the
announcement in the transaction that inserts its row. An API process killed in between (SIGKILL,
out of memory) leaves the announcement behind; once it is older than any request can last, the
originals it names that have no row are removed, and so are the announcements.
"""

from __future__ import annotations

import logging

from common.storage import ObjectStore, original_key
from db import upload_intents
from db.pool import Database
from engine.periodic import PeriodicChore

log = logging.getLogger(__name__)


class AbandonedUploadSweeper:
    """A daemon thread that, every `interval_seconds`, removes the originals of uploads
    announced more than `age_seconds` ago that never got a row."""

    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        *,
        interval_seconds: float = 60.0,
        age_seconds: float = 3600.0,
        batch_limit: int = 500,
    ) -> None:
        self._db = db
        self._store = store
        self._interval = interval_seconds
        self._age = age_seconds
        self._limit = batch_limit
        self._chore = PeriodicChore("abandoned-upload-sweeper", self.sweep_once, interval_seconds)

    def start(self) -> None:
        self._chore.start()

    def stop(self) -> None:
        self._chore.stop()

    def sweep_once(self) -> int:
        """Remove one round of abandoned originals; returns how many."""
        # The intents stay locked until the originals are gone: a request that commits its
        # rows meanwhile waits, then finds its intents taken and refuses to commit.
        with self._db.transaction() as conn:
            announced = upload_intents.claim_abandoned(conn, self._age, self._limit)
            if not announced:
                return 0
            abandoned = upload_intents.without_rows(conn, announced)
            for image_id in abandoned:
                self._store.delete_original(original_key(image_id))
            upload_intents.release(conn, announced)
        if abandoned:
            log.info("removed %d originals of abandoned uploads", len(abandoned))
        return len(abandoned)
