"""The abandoned-upload sweeper: removes originals whose upload request died before their rows.

The API announces each original in `upload_intents` before storing it and releases the
announcement in the transaction that inserts its row. An API process killed in between (SIGKILL,
out of memory) leaves the announcement behind; once it is older than any request can last, the
originals it names that have no row are removed, and so are the announcements.
"""

from __future__ import annotations

import logging
import threading

from common.errors import DependencyUnavailable
from common.storage import ObjectStore, original_key
from db import upload_intents
from db.pool import Database

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
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="abandoned-upload-sweeper", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

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

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sweep_once()
            except DependencyUnavailable as exc:
                log.warning("abandoned-upload sweep skipped: %s", exc)
            except Exception:
                log.exception("abandoned-upload sweep failed")
