"""The dead-letter reaper: ends as `failed` the images whose job the broker gave up on.

A job message is dead-lettered when it comes back more often than the queue's delivery limit:
usually the batch pipeline has already failed its image on the last delivery, but not when the
database was unreachable right then, or when a batch died of an unexpected error. Without this
reaper such an image would stay `pending` or `processing` until an operator ran `ops dlq`. Rows
far back in a long queue are never touched: only a dead-lettered message makes an image a
candidate, and only after a grace period that leaves operators time to requeue it instead.
"""

from __future__ import annotations

import contextlib
import logging

import pika

from common.broker import BROKER_ERRORS, connection_parameters, declare_topology
from common.cache import ImageCache
from common.config import QueueSettings
from common.dead_letters import DeadLetter, take_dead_letters
from common.errors import DependencyUnavailable
from db import images
from db.pool import Database
from engine.periodic import PeriodicChore

log = logging.getLogger(__name__)

_EXPECTED_ERRORS: tuple[type[Exception], ...] = (DependencyUnavailable, *BROKER_ERRORS)


class DeadLetterReaper:
    """A daemon thread that fails the images of dead letters older than `grace_seconds`.

    Each round holds up to `scan_limit` dead letters unacknowledged on a channel of its own,
    commits the failures, then acknowledges those messages; the rest (younger ones, malformed
    ones, which stay for `ops dlq`) return to the queue when the channel closes. Several nodes may
    reap at once: a message held by one is invisible to the others.
    """

    def __init__(
        self,
        db: Database,
        cache: ImageCache,
        queue: QueueSettings,
        *,
        grace_seconds: float,
        interval_seconds: float = 30.0,
        scan_limit: int = 1000,
    ) -> None:
        self._db = db
        self._cache = cache
        self._queue = queue
        self._grace = grace_seconds
        self._limit = scan_limit
        self._chore = PeriodicChore(
            "dead-letter-reaper", self.reap_once, interval_seconds, expected=_EXPECTED_ERRORS
        )

    def start(self) -> None:
        self._chore.start()

    def stop(self) -> None:
        self._chore.stop()

    def reap_once(self) -> int:
        """One round; returns how many images it ended as failed."""
        connection = pika.BlockingConnection(connection_parameters(self._queue))
        try:
            channel = connection.channel()
            declare_topology(channel, self._queue)
            letters = take_dead_letters(channel, self._queue.dead_letter_queue, self._limit)
            due = [d for d in letters if self._is_due(d)]
            if not due:
                return 0
            with self._db.transaction() as conn:
                failed = images.fail_unfinished(
                    conn, [(d.image_id, d.image_error) for d in due if d.image_id is not None]
                )
            for letter in due:
                channel.basic_ack(letter.delivery_tag)
        finally:
            with contextlib.suppress(*BROKER_ERRORS):
                connection.close()
        self._cache.invalidate(failed, announce=True)
        if failed:
            log.warning("failed %d images whose jobs were dead-lettered", len(failed))
        return len(failed)

    def _is_due(self, letter: DeadLetter) -> bool:
        if letter.image_id is None:
            return False  # malformed: left for an operator (`ops dlq list`, `ops dlq fail`)
        return letter.died_at is None or letter.dead_for_seconds() >= self._grace
