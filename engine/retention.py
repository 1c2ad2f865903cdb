"""The retention sweeper: deletes settled batches and images once they are older than
BATCH_RETENTION_DAYS / IMAGE_RETENTION_DAYS, rows, objects and cache entries together.

Each round is bounded (RETENTION_SWEEP_LIMIT images, as many empty batches) and takes its rows
with SKIP LOCKED, so every node can run it. The rows go first, in the transaction that records
their objects in `expired_objects`; the objects are removed after, and their records last. A node
killed or a storage outage at any point leaves only records of objects still to remove, which the
next round (on any node) removes: no object is left without a record of it, and no image row is
left without its objects. A batch goes once its last image has, with its delivered events.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from common.cache import ImageCache
from common.config import RetentionSettings
from common.storage import ObjectStore
from db import retention
from db.pool import Database
from db.retention import ORIGINALS, ExpiredObject
from engine.periodic import PeriodicChore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionRound:
    """What one round removed."""

    images: int
    objects: int
    batches: int


class RetentionSweeper:
    """A daemon thread that, every `sweep_seconds`, removes one bounded round of expired work
    (nothing at all while both retention settings are 0)."""

    def __init__(
        self, db: Database, store: ObjectStore, cache: ImageCache, settings: RetentionSettings
    ) -> None:
        self._db = db
        self._store = store
        self._cache = cache
        self._settings = settings
        self._chore = PeriodicChore("retention-sweeper", self.sweep_once, settings.sweep_seconds)

    def start(self) -> None:
        if self._settings.enabled:
            self._chore.start()

    def stop(self) -> None:
        self._chore.stop()

    def sweep_once(self) -> RetentionRound:
        # Objects a round cut short left behind first, so that they never wait on new work.
        leftover = self._remove_expired_objects()
        expired = self._expire_images()
        removed = self._remove_expired_objects()
        gone = self._drop_empty_batches()
        done = RetentionRound(len(expired), leftover + removed, len(gone))
        if done != RetentionRound(0, 0, 0):
            log.info(
                "retention: removed %d images (%d objects) and %d batches",
                done.images,
                done.objects,
                done.batches,
            )
        return done

    def _expire_images(self) -> list[uuid.UUID]:
        """Delete one round of expired image rows, recording their objects."""
        limit, settings = self._settings.sweep_limit, self._settings
        with self._db.transaction() as conn:
            ids: list[uuid.UUID] = []
            if settings.batch_days:
                ids += retention.expired_batch_images(conn, settings.batch_days, limit)
            if settings.image_days and len(ids) < limit:
                ids += retention.expired_loose_images(conn, settings.image_days, limit - len(ids))
            deleted = retention.delete_expired_images(conn, ids) if ids else []
        expired = [record.id for record in deleted]
        # Readers must not be answered from the cache with an image that is gone.
        self._cache.invalidate(expired)
        return expired

    def _remove_expired_objects(self) -> int:
        """Remove one round of recorded objects from storage, then their records; a storage
        outage keeps the records (and the round's transaction) for a later round."""
        with self._db.transaction() as conn:
            # An original and a few renditions per image; any left over go first next round.
            objects = retention.claim_expired_objects(conn, self._settings.sweep_limit * 4)
            for item in objects:
                self._remove(item)
            if objects:
                retention.forget_expired_objects(conn, objects)
        return len(objects)

    def _remove(self, item: ExpiredObject) -> None:
        if item.bucket == ORIGINALS:
            self._store.delete_original(item.key)
        else:
            self._store.delete_result(item.key)

    def _drop_empty_batches(self) -> list[uuid.UUID]:
        if not self._settings.batch_days:
            return []
        with self._db.transaction() as conn:
            return retention.delete_empty_expired_batches(
                conn, self._settings.batch_days, self._settings.sweep_limit
            )
