"""The webhook deliverer: sends the batch and image events queued in `webhook_deliveries`.

It runs as a thread in every worker node, next to the outbox sweeper: the nodes run anyway, they
already hold a database pool, and delivery is a little I/O per batch, not image work, so a
process of its own would add something to deploy and watch for no gain. Nodes share the work
through leases (`FOR UPDATE SKIP LOCKED`, then a lease time): each due event is sent by one node
at a time, at least once, with exponential backoff and jitter until it is `retry_hours` old.

One slow or hostile receiver must not delay anyone else's events. Each attempt has one deadline
(`common.webhooks`), and a node starts only as many attempts as it has free senders, chosen
round-robin between owners, with at most `PER_OWNER` in flight for one owner and `PER_TARGET` for
one receiver (scheme, host and port): a receiver that holds every attempt to its deadline holds
at most that many senders, never the queue.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from common.config import WebhookSettings
from common.errors import DependencyUnavailable
from common.webhooks import (
    DEFAULT_PORTS,
    AttemptResult,
    Deadline,
    Resolver,
    SecretBox,
    SecretUnreadable,
    TargetRefused,
    check_callback_url,
    post_event,
    resolve_target,
    signature_headers,
    system_resolver,
)
from db import batches, images, webhook_deliveries
from db.images import ImageRecord
from db.pool import Database
from db.webhook_deliveries import DueCandidate, DueDelivery
from engine.periodic import PeriodicChore

log = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 10.0
MAX_RETRY_SECONDS = 3600.0
SENDERS = 8
PER_OWNER = 2
PER_TARGET = 2
# Due events read per round to choose from; owners at their limit are left out of the read.
CANDIDATES = 200
# A claimed event's lease outlasts its attempt's deadline by this much (recording the result).
LEASE_MARGIN_SECONDS = 30.0


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


def target_key(callback_url: str | None) -> str:
    """The receiver a callback URL names (`scheme://host:port`), what deliveries in flight are
    counted by; the URL itself when it does not parse (its attempt then fails)."""
    try:
        parts = urlsplit(callback_url or "")
        port = parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError:
        return callback_url or ""
    return f"{parts.scheme}://{parts.hostname}:{port}"


@dataclass(frozen=True)
class InFlight:
    """Attempts under way on this node, by owner and by receiver."""

    owners: Counter[str]
    targets: Counter[str]


def choose_fairly(
    candidates: Sequence[DueCandidate], in_flight: InFlight, free: int
) -> list[DueCandidate]:
    """Up to `free` of `candidates` (oldest due first) to start now: one per owner in turn,
    each owner's oldest first, skipping an owner with `PER_OWNER` attempts in flight and a
    receiver with `PER_TARGET`. Counts what it chooses into `in_flight`."""
    waiting: dict[str, list[DueCandidate]] = {}
    for candidate in candidates:
        waiting.setdefault(candidate.owner, []).append(candidate)
    chosen: list[DueCandidate] = []
    while waiting and len(chosen) < free:
        for owner in list(waiting):
            pick = _next_startable(waiting[owner], in_flight)
            if pick is None:
                del waiting[owner]
                continue
            waiting[owner].remove(pick)
            in_flight.owners[owner] += 1
            in_flight.targets[target_key(pick.callback_url)] += 1
            chosen.append(pick)
            if len(chosen) == free:
                break
    return chosen


def _next_startable(queue: list[DueCandidate], in_flight: InFlight) -> DueCandidate | None:
    if not queue or in_flight.owners[queue[0].owner] >= PER_OWNER:
        return None
    return next(
        (c for c in queue if in_flight.targets[target_key(c.callback_url)] < PER_TARGET), None
    )


class WebhookDeliverer:
    """A daemon thread that starts due events on free senders every `settings.sweep_seconds`."""

    def __init__(
        self,
        db: Database,
        settings: WebhookSettings,
        *,
        resolve: Resolver = system_resolver,
        senders: int = SENDERS,
    ) -> None:
        self._db = db
        self._resolve = resolve
        self._settings = settings
        self._box = SecretBox(settings.encryption_key)
        self._senders = senders
        self._pool = ThreadPoolExecutor(max_workers=senders, thread_name_prefix="webhook")
        self._lock = threading.Lock()
        self._in_flight = InFlight(Counter(), Counter())
        self._chore = PeriodicChore("webhook-deliverer", self.start_due, settings.sweep_seconds)

    def start(self) -> None:
        self._chore.start()

    def stop(self) -> None:
        """No new attempts; those under way end by their deadline."""
        self._chore.stop(timeout=30)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def deliver_once(self) -> int:
        """Send every event due now, as fairly as `start_due` does, and wait for them; returns
        how many were attempted (for tests and tools)."""
        attempted = 0
        while started := self.start_due():
            wait(started)
            attempted += len(started)
        return attempted

    def start_due(self) -> list[Future[None]]:
        """Claim due events for the senders that are free, chosen fairly, and start them."""
        with self._lock:
            free = self._senders - self._in_flight.owners.total()
            full = [o for o, n in self._in_flight.owners.items() if n >= PER_OWNER]
        if free <= 0:
            return []
        with self._db.transaction() as conn:
            candidates = webhook_deliveries.due_candidates(conn, CANDIDATES, full)
        with self._lock:
            chosen = choose_fairly(candidates, self._in_flight, free)
        if not chosen:
            return []
        try:
            lease = self._settings.timeout_seconds + LEASE_MARGIN_SECONDS
            with self._db.transaction() as conn:
                claimed = webhook_deliveries.claim(conn, [c.id for c in chosen], lease)
        except BaseException:
            self._release(chosen)
            raise
        claimed_ids = {d.id for d in claimed}
        self._release([c for c in chosen if c.id not in claimed_ids])  # another node has them
        return [self._pool.submit(self._attempt, delivery) for delivery in claimed]

    def _release(self, deliveries: Sequence[DueCandidate | DueDelivery]) -> None:
        with self._lock:
            for delivery in deliveries:
                self._in_flight.owners[delivery.owner] -= 1
                self._in_flight.targets[target_key(delivery.callback_url)] -= 1
            for counter in (self._in_flight.owners, self._in_flight.targets):
                # Drop the owners and receivers with nothing in flight any more.
                for key in [k for k, n in counter.items() if n <= 0]:
                    del counter[key]

    def _attempt(self, delivery: DueDelivery) -> None:
        try:
            self._attempt_and_record(delivery)
        finally:
            self._release([delivery])

    def _attempt_and_record(self, delivery: DueDelivery) -> None:
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
        callback = check_callback_url(delivery.callback_url, self._settings)
        body = self._body(delivery).encode()
        headers = signature_headers(
            self._box.open(delivery.webhook_secret), str(delivery.id), int(time.time()), body
        )
        deadline = Deadline(self._settings.timeout_seconds)
        try:
            target = resolve_target(callback, self._settings, self._resolve, deadline)
        except TimeoutError:
            return AttemptResult(False, "timed out")
        return post_event(target, body, headers, deadline)

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
