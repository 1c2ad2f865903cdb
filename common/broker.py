"""RabbitMQ topology (declaring, inspecting and deleting the queues), the routing of a job to its
lane's queue, and the confirmed publisher of job messages.

Every job queue is a quorum queue with a delivery limit: a message that keeps coming back (a
worker crashing on it) is moved to the one dead-letter queue instead of looping forever. The job
queues are the interactive lane, one per bulk shard, and the base queue named `RABBITMQ_QUEUE`
(where every job goes with lanes off, and where jobs from before lanes wait); see `job_queues`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel
from pika.channel import Channel

from common.config import QueueSettings
from common.errors import DependencyUnavailable
from common.jobs import INTERACTIVE, JobMessage

log = logging.getLogger(__name__)

BROKER_ERRORS: tuple[type[Exception], ...] = (pika.exceptions.AMQPError, OSError)


def connection_parameters(settings: QueueSettings) -> pika.URLParameters:
    params = pika.URLParameters(settings.url)
    params.heartbeat = settings.heartbeat_seconds
    params.blocked_connection_timeout = 30
    params.socket_timeout = 5
    params.connection_attempts = 1
    return params


def dead_letter_queue_arguments() -> dict[str, Any]:
    return {"x-queue-type": "quorum"}


def broker_delivery_limit(settings: QueueSettings) -> int:
    """Deliveries after which the broker dead-letters a job: twice RABBITMQ_DELIVERY_LIMIT.

    The engine counts an image's attempts itself (its claims, in its row) and gives up with a
    reason after RABBITMQ_DELIVERY_LIMIT of them. The broker also counts deliveries that were
    no attempt (messages returned when a connection to it dropped), so its own limit leaves as
    many again for those; it remains the backstop for a job no node can even claim.
    """
    return 2 * settings.delivery_limit


def job_queue_arguments(settings: QueueSettings) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": broker_delivery_limit(settings),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.dead_letter_queue,
    }


# The lane of the base queue in `JobQueue`: it belongs to no lane.
BASE = "base"


@dataclass(frozen=True)
class JobQueue:
    """One queue job messages travel in: the interactive lane, a bulk shard, or the base queue."""

    name: str
    lane: str
    shard: int = 0

    @property
    def label(self) -> str:
        """How operators see it: `interactive`, `bulk.2`, `base`."""
        return f"{self.lane}.{self.shard}" if self.lane not in (INTERACTIVE, BASE) else self.lane


def job_queues(settings: QueueSettings) -> list[JobQueue]:
    """Every job queue: the interactive lane (worker nodes serve it first), the bulk shards and
    the base queue (jobs published with lanes off, or from before lanes existed), which nodes
    take in turn. Names derive from `RABBITMQ_QUEUE`."""
    base = settings.queue
    return [
        JobQueue(f"{base}.{INTERACTIVE}", INTERACTIVE),
        *(JobQueue(f"{base}.bulk.{shard}", "bulk", shard) for shard in range(settings.bulk_shards)),
        JobQueue(base, BASE),
    ]


def route(settings: QueueSettings, job: JobMessage) -> str:
    """The queue `job` is published to: its lane's (its shard's), or the base queue with lanes
    off. A shard beyond today's count (the count was lowered) wraps around."""
    if not settings.lanes:
        return settings.queue
    if job.lane == INTERACTIVE:
        return f"{settings.queue}.{INTERACTIVE}"
    return f"{settings.queue}.bulk.{job.shard % settings.bulk_shards}"


def declare_topology(channel: BlockingChannel, settings: QueueSettings) -> None:
    """Create the job queues and the dead-letter queue where they do not exist yet.

    A queue's arguments cannot change once it exists, and a declaration with other arguments is
    refused; so an existing queue is used as it is (a changed RABBITMQ_DELIVERY_LIMIT applies to
    new queues, or through a RabbitMQ policy), instead of taking every client down.
    """
    _declare_if_missing(channel, settings.dead_letter_queue, dead_letter_queue_arguments())
    for queue in job_queues(settings):
        _declare_if_missing(channel, queue.name, job_queue_arguments(settings))


def _declare_if_missing(channel: BlockingChannel, queue: str, arguments: dict[str, Any]) -> None:
    # A passive declaration of a missing queue closes its channel: probe on a throwaway one.
    probe = channel.connection.channel()
    try:
        probe.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 404:
            raise
        channel.queue_declare(queue, durable=True, arguments=arguments)
        return
    if probe.is_open:
        probe.close()


def ensure_topology(settings: QueueSettings) -> None:
    """`declare_topology` over a short-lived connection of its own."""
    connection = pika.BlockingConnection(connection_parameters(settings))
    try:
        declare_topology(connection.channel(), settings)
    finally:
        if connection.is_open:
            connection.close()


@dataclass(frozen=True)
class QueueCounts:
    """What a passive declaration tells about a queue: ready messages and consumers."""

    ready: int
    consumers: int


def queue_counts(settings: QueueSettings, queue: str | None = None) -> QueueCounts:
    """Counts of `queue`, over a short-lived connection; by default of all job queues together
    (ready messages summed; consumers: the most any one has, as every node consumes each). A
    missing queue raises the broker's ChannelClosedByBroker (404)."""
    names = [queue] if queue else [q.name for q in job_queues(settings)]
    connection = pika.BlockingConnection(connection_parameters(settings))
    try:
        channel = connection.channel()
        counts = [channel.queue_declare(name, passive=True).method for name in names]
        return QueueCounts(
            sum(int(c.message_count) for c in counts), max(int(c.consumer_count) for c in counts)
        )
    finally:
        if connection.is_open:
            connection.close()


def lane_depths(settings: QueueSettings) -> dict[str, int]:
    """Ready messages of each job queue by its label (`interactive`, `bulk.0`, ..., `base`), over
    one short-lived connection."""
    connection = pika.BlockingConnection(connection_parameters(settings))
    try:
        channel = connection.channel()
        return {
            q.label: int(channel.queue_declare(q.name, passive=True).method.message_count)
            for q in job_queues(settings)
        }
    finally:
        if connection.is_open:
            connection.close()


def queue_depth(settings: QueueSettings, queue: str | None = None) -> int:
    """Ready messages in `queue` (in all job queues together by default)."""
    return queue_counts(settings, queue).ready


def delete_topology(settings: QueueSettings) -> None:
    """Delete the job queues and the dead-letter queue, messages and all (a missing one is fine):
    the clean-up of a throwaway queue of a test or benchmark run."""
    connection = pika.BlockingConnection(connection_parameters(settings))
    try:
        channel = connection.channel()
        for queue in (*(q.name for q in job_queues(settings)), settings.dead_letter_queue):
            channel.queue_delete(queue)
    finally:
        if connection.is_open:
            connection.close()


class _PendingBatch:
    """Jobs published together; done when the broker has confirmed (or refused) every one."""

    def __init__(self, jobs: Sequence[JobMessage]) -> None:
        self.jobs = jobs
        self.unconfirmed: set[int] = set()
        self.error: str | None = None
        self.done = threading.Event()

    def settle(self, tag: int, ok: bool) -> None:
        self.unconfirmed.discard(tag)
        if not ok and self.error is None:
            self.error = "the broker refused a message"
        if not self.unconfirmed:
            self.done.set()

    def fail(self, reason: str) -> None:
        self.error = self.error or reason
        self.done.set()


class JobPublisher:
    """Publishes persistent job messages and waits until the broker confirms all of them.

    Publisher confirms are awaited per batch, not per message: one I/O thread owns an
    asynchronous connection, sends a whole batch back to back and settles it from the broker's
    (often `multiple`) acks. Safe to share between threads; create it after fork. The connection
    is opened on first use and reopened after a failure.
    """

    dependency = "message broker"

    def __init__(self, settings: QueueSettings, confirm_timeout: float = 10.0) -> None:
        self.settings = settings
        self._confirm_timeout = confirm_timeout
        self._lock = threading.Lock()
        self._connection: pika.SelectConnection | None = None
        self._channel: Channel | None = None
        self._ready = threading.Event()
        self._open_error: str | None = None
        self._thread: threading.Thread | None = None
        self._next_tag = 0
        self._by_tag: dict[int, _PendingBatch] = {}

    def publish(self, jobs: Sequence[JobMessage]) -> None:
        """Publish `jobs`; returns once the broker has confirmed every one of them."""
        if not jobs:
            return
        batch = _PendingBatch(jobs)
        connection = self._ensure_open()
        try:
            connection.ioloop.add_callback_threadsafe(lambda: self._send(batch))
        except BROKER_ERRORS as exc:
            raise DependencyUnavailable(self.dependency) from exc
        if not batch.done.wait(self._confirm_timeout):
            self._reset("confirms did not arrive in time")
            raise DependencyUnavailable(self.dependency, "message broker did not confirm in time")
        if batch.error is not None:
            raise DependencyUnavailable(self.dependency, f"message broker: {batch.error}")

    def check(self) -> None:
        self._ensure_open()

    def close(self) -> None:
        self._reset("publisher closed")

    def _ensure_open(self) -> pika.SelectConnection:
        with self._lock:
            if (
                self._connection is not None
                and self._channel is not None
                and (self._channel.is_open)
            ):
                return self._connection
            self._reset_locked("reconnecting")
            try:
                ensure_topology(self.settings)
            except BROKER_ERRORS as exc:
                raise DependencyUnavailable(self.dependency) from exc
            self._ready.clear()
            self._open_error = None
            self._connection = pika.SelectConnection(
                connection_parameters(self.settings),
                on_open_callback=self._on_connection_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_connection_closed,
            )
            self._thread = threading.Thread(
                target=self._connection.ioloop.start, name="job-publisher", daemon=True
            )
            self._thread.start()
            if not self._ready.wait(self._confirm_timeout) or self._open_error is not None:
                reason = self._open_error or "timed out connecting"
                self._reset_locked(reason)
                raise DependencyUnavailable(self.dependency, f"message broker: {reason}")
            return self._connection

    # Everything below runs on the I/O thread, except the _reset helpers.

    def _on_connection_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Channel) -> None:
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_returned)
        channel.confirm_delivery(self._on_confirm, callback=lambda _: self._on_ready(channel))

    def _on_ready(self, channel: Channel) -> None:
        self._channel = channel
        self._next_tag = 0
        self._ready.set()

    def _send(self, batch: _PendingBatch) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            batch.fail("channel closed")
            return
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json"
        )
        for job in batch.jobs:
            self._next_tag += 1
            batch.unconfirmed.add(self._next_tag)
            self._by_tag[self._next_tag] = batch
            channel.basic_publish(
                "", route(self.settings, job), job.encode(), properties, mandatory=True
            )

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        tags = (
            [t for t in self._by_tag if t <= method.delivery_tag]
            if method.multiple
            else [method.delivery_tag]
        )
        for tag in tags:
            batch = self._by_tag.pop(tag, None)
            if batch is not None:
                batch.settle(tag, ok)

    def _on_returned(self, channel: Channel, method: Any, props: Any, body: bytes) -> None:
        # An unroutable message is still acked afterwards; mark its batch failed first.
        for batch in set(self._by_tag.values()):
            if any(job.encode() == body for job in batch.jobs):
                batch.error = batch.error or "a job could not be routed to the queue"

    def _on_open_error(self, connection: pika.SelectConnection, error: BaseException) -> None:
        self._open_error = str(error) or type(error).__name__
        self._ready.set()
        connection.ioloop.stop()

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        self._fail_pending(f"channel closed: {reason}")
        self._open_error = self._open_error or f"channel closed: {reason}"
        self._ready.set()
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _on_connection_closed(
        self, connection: pika.SelectConnection, reason: BaseException
    ) -> None:
        self._fail_pending(f"connection closed: {reason}")
        self._channel = None
        connection.ioloop.stop()

    def _fail_pending(self, reason: str) -> None:
        pending, self._by_tag = set(self._by_tag.values()), {}
        for batch in pending:
            batch.fail(reason)

    def _reset(self, reason: str) -> None:
        with self._lock:
            self._reset_locked(reason)

    def _reset_locked(self, reason: str) -> None:
        connection, thread = self._connection, self._thread
        self._connection, self._channel, self._thread = None, None, None
        if connection is None:
            return
        if not connection.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                connection.ioloop.add_callback_threadsafe(lambda: _close_quietly(connection))
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        log.debug("job publisher reset: %s", reason)


def _close_quietly(connection: pika.SelectConnection) -> None:
    try:
        connection.close()
    except BROKER_ERRORS:
        connection.ioloop.stop()
