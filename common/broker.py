"""RabbitMQ topology and the confirmed publisher of job messages.

The job queue is a quorum queue with a delivery limit: a message that keeps coming back (a worker
crashing on it) is moved to the dead-letter queue instead of looping forever.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from common.config import QueueSettings
from common.errors import DependencyUnavailable
from common.jobs import JobMessage

log = logging.getLogger(__name__)

BROKER_ERRORS = (pika.exceptions.AMQPError, OSError)


def connection_parameters(settings: QueueSettings, heartbeat: int = 30) -> pika.URLParameters:
    params = pika.URLParameters(settings.url)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 30
    params.socket_timeout = 5
    params.connection_attempts = 1
    return params


def declare_topology(channel: BlockingChannel, settings: QueueSettings) -> None:
    """Declare the job queue and its dead-letter queue (idempotent, same arguments everywhere)."""
    channel.queue_declare(
        settings.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    channel.queue_declare(
        settings.queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": settings.delivery_limit,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": settings.dead_letter_queue,
        },
    )


class JobPublisher:
    """Publishes persistent job messages and waits for the broker's confirms.

    One connection per process, opened on first use and reopened after a failure; a lock makes it
    safe to share between the threads of one gunicorn worker.
    """

    dependency = "message broker"

    def __init__(self, settings: QueueSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def publish(self, jobs: Sequence[JobMessage]) -> None:
        """Publish `jobs`; returns only once the broker has confirmed every one of them."""
        with self._lock:
            try:
                self._publish_locked(jobs)
            except BROKER_ERRORS as first:
                log.info("broker publish failed (%s); reconnecting once", first)
                self._close_locked()
                try:
                    self._publish_locked(jobs)
                except BROKER_ERRORS as exc:
                    self._close_locked()
                    raise DependencyUnavailable(self.dependency) from exc

    def check(self) -> None:
        with self._lock:
            try:
                self._ensure_channel()
            except BROKER_ERRORS as exc:
                self._close_locked()
                raise DependencyUnavailable(self.dependency) from exc

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _publish_locked(self, jobs: Sequence[JobMessage]) -> None:
        channel = self._ensure_channel()
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json"
        )
        for job in jobs:
            channel.basic_publish(
                exchange="",
                routing_key=self.settings.queue,
                body=job.encode(),
                properties=properties,
                mandatory=True,
            )

    def _ensure_channel(self) -> BlockingChannel:
        if self._connection is not None and self._connection.is_open:
            # Serve heartbeats that came due while the API was idle.
            self._connection.process_data_events(0)
        if self._channel is None or not self._channel.is_open:
            self._close_locked()
            self._connection = pika.BlockingConnection(connection_parameters(self.settings))
            channel = self._connection.channel()
            declare_topology(channel, self.settings)
            channel.confirm_delivery()
            self._channel = channel
        return self._channel

    def _close_locked(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except BROKER_ERRORS:
                pass
