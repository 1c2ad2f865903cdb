"""The webhook deliverer: sends the batch and image events queued in `webhook_deliveries`.

It runs as a thread in every worker node, next to the outbox sweeper: the nodes run anyway, they
already hold a database pool, and delivery is a little I/O per batch, not image work, so a
process of its own would add something to deploy and watch for no gain. Nodes share the work
through leases (`FOR UPDATE SKIP LOCKED`, then a lease time): each due event is sent by one node
at a time, at least once, with exponential backoff and jitter until it is `retry_hours` old.
"""

from __future__ import annotations

import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from common.config import WebhookSettings
from common.errors import DependencyUnavailable
from common.webhooks import (
    AttemptResult,
    Resolver,
    SecretBox,
    SecretUnreadable,
    TargetRefused,
    check_target,
    post_event,
    signature_headers,
    system_resolver,
)
from db import batches, images, webhook_deliveries
from db.images import ImageRecord
from db.pool import Database
from db.webhook_deliveries import DueDelivery
from engine.periodic import PeriodicChore

log = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 10.0
MAX_RETRY_SECONDS = 3600.0
SENDERS = 4


def retry_delay(attempts: int, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt after `attempts` failed ones: doubling from 10 s up to an
    hour, with "equal jitter" (half fixed, half random) so that receivers coming back after an
    outage are not hit by every event at once."""
    ceiling = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** max(0, attempts - 1))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def image_event_data(record: ImageRecord) -> dict[str, object]:
    """What an `image.completed` / `image.failed` event says about its image."""
    return {
        "id": str(record.id),
        "batch_id": None if record.batch_id is None else str(record.batch_id),
        "filename": record.filename,
        "status": record.status,
        "error": record.error,
        "result_key": record.result_key,
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
    }


class WebhookDeliverer:
    """A daemon thread that sends due events every `settings.sweep_seconds`."""

    def __init__(
        self,
        db: Database,
        settings: WebhookSettings,
        *,
        batch_limit: int = 50,
        resolve: Resolver = system_resolver,
    ) -> None:
        self._db = db
        self._resolve = resolve
        self._settings = settings
        self._box = SecretBox(settings.encryption_key)
        self._limit = batch_limit
        self._senders = ThreadPoolExecutor(max_workers=SENDERS, thread_name_prefix="webhook")
        self._chore = PeriodicChore("webhook-deliverer", self.deliver_once, settings.sweep_seconds)

    def start(self) -> None:
        self._chore.start()

    def stop(self) -> None:
        self._chore.stop(timeout=30)
        self._senders.shutdown(wait=True)

    def deliver_once(self) -> int:
        """Send one round of due events; returns how many were attempted."""
        # A lease long enough for a whole round: every sender may wait out its timeout.
        lease = self._settings.timeout_seconds * (self._limit / SENDERS + 2) + 30
        with self._db.transaction() as conn:
            due = webhook_deliveries.claim_due(conn, self._limit, lease)
        if due:
            list(self._senders.map(self._attempt, due))
        return len(due)

    def _attempt(self, delivery: DueDelivery) -> None:
        try:
            result = self._send(delivery)
        except (TargetRefused, SecretUnreadable) as exc:
            result = AttemptResult(False, str(exc))
        except DependencyUnavailable:
            return  # the lease runs out and another round tries again
        except Exception:
            log.exception("webhook delivery %s failed unexpectedly", delivery.id)
            result = AttemptResult(False, "internal error while sending")
        try:
            self._record(delivery, result)
        except DependencyUnavailable:
            log.warning("could not record webhook delivery %s; it may be sent again", delivery.id)

    def _send(self, delivery: DueDelivery) -> AttemptResult:
        if delivery.callback_url is None or delivery.webhook_secret is None:
            return AttemptResult(False, "the batch has no callback URL")
        target = check_target(delivery.callback_url, self._settings.allow_private, self._resolve)
        body = self._body(delivery).encode()
        headers = signature_headers(
            self._box.open(delivery.webhook_secret), str(delivery.id), int(time.time()), body
        )
        return post_event(target, body, headers, self._settings.timeout_seconds)

    def _body(self, delivery: DueDelivery) -> str:
        """The event's JSON: built at the first attempt, then the same bytes on every retry."""
        if delivery.payload is not None:
            return delivery.payload
        event = {
            "type": delivery.event_type,
            "timestamp": datetime.now(UTC).isoformat(),
            "data": self._event_data(delivery),
        }
        with self._db.transaction() as conn:
            return webhook_deliveries.save_payload(conn, delivery.id, json.dumps(event))

    def _event_data(self, delivery: DueDelivery) -> dict[str, object]:
        if delivery.snapshot is not None:
            return batches.batch_document(batches.record_from_snapshot(delivery.snapshot))
        with self._db.transaction() as conn:
            if delivery.image_id is not None:
                record = images.get_image(conn, delivery.image_id)
                if record is not None:
                    return image_event_data(record)
                return {"id": str(delivery.image_id), "status": "deleted"}
            batch = batches.get_batch(conn, delivery.batch_id)
        assert batch is not None  # deliveries reference their batch
        return batches.batch_document(batch)

    def _record(self, delivery: DueDelivery, result: AttemptResult) -> None:
        with self._db.transaction() as conn:
            if result.delivered:
                webhook_deliveries.mark_delivered(conn, delivery.id)
                return
            age_hours = (datetime.now(UTC) - delivery.created_at).total_seconds() / 3600
            if age_hours >= self._settings.retry_hours:
                webhook_deliveries.abandon(conn, delivery.id, result.detail)
                log.error(
                    "abandoned webhook %s for batch %s after %d attempts: %s",
                    delivery.event_type,
                    delivery.batch_id,
                    delivery.attempts,
                    result.detail,
                )
                return
            delay = retry_delay(delivery.attempts)
            webhook_deliveries.schedule_retry(conn, delivery.id, result.detail, delay)
        log.info(
            "webhook %s for batch %s not delivered (%s); retry in %.0f s",
            delivery.event_type,
            delivery.batch_id,
            result.detail,
            delay,
        )
