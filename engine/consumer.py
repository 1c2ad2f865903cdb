"""The consumer: the one thread that talks to RabbitMQ.

It prefetches job messages, groups them into batches (up to `batch_size` messages or
`batch_wait_ms` after the first), hands each batch to a batch thread, and applies the verdicts
(ack, requeue, dead-letter) when they come back. pika's connection is not thread-safe, so every
channel operation happens here; the loop keeps serving heartbeats while batches run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from common.broker import BROKER_ERRORS, connection_parameters, declare_topology
from common.config import EngineSettings, QueueSettings
from engine import metrics
from engine.batch import Delivery, Verdict

log = logging.getLogger(__name__)

MAX_BATCHES_IN_FLIGHT = 2
# The pause after a batch requeued messages for failures of their own images (a dependency
# outage holds the batch instead: see engine.dependencies), and the cap of reconnection delays.
MAX_BACKOFF_SECONDS = 10.0
# The longest the consumer waits for broker events before checking its stop flag again.
IDLE_POLL_SECONDS = 0.1


def _nothing() -> None:
    """A callback whose only effect is to end `process_data_events`' wait."""


class Backoff:
    """Exponential delay after consecutive failures, reset by a success."""

    def __init__(self, first: float = 0.5, cap: float = MAX_BACKOFF_SECONDS) -> None:
        self._first, self._cap, self._failures = first, cap, 0

    def failed(self) -> float:
        self._failures += 1
        return float(min(self._cap, self._first * 2 ** (self._failures - 1)))

    def succeeded(self) -> None:
        self._failures = 0


class BatchConsumer:
    """Turns a stream of deliveries into batches and their verdicts into acks."""

    def __init__(
        self,
        queue: QueueSettings,
        engine: EngineSettings,
        process_batch: Callable[[list[Delivery]], Verdict],
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        """`paused()` is true while a dependency the batches need is down: no batch is started
        then, and the received messages wait unacknowledged (see `engine.dependencies`)."""
        self._queue = queue
        self._paused = paused
        self._engine = engine
        self._process_batch = process_batch
        self._batches = ThreadPoolExecutor(MAX_BATCHES_IN_FLIGHT, thread_name_prefix="batch")
        self._stop = threading.Event()
        self.completed = 0
        self.failed = 0
        self.batches = 0

    def stop(self) -> None:
        """Ask the loop to drain: stop receiving, finish and commit what was received, return."""
        self._stop.set()

    def run(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                connection = pika.BlockingConnection(connection_parameters(self._queue))
            except BROKER_ERRORS as exc:
                delay = backoff.failed()
                log.warning("cannot reach RabbitMQ (%s); retrying in %.1fs", exc, delay)
                self._stop.wait(delay)
                continue
            session = _Session(connection, self)
            try:
                session.serve()
            except BROKER_ERRORS as exc:
                if session.batches_done:
                    backoff.succeeded()
                delay = backoff.failed()
                log.warning("lost RabbitMQ channel (%s); reconnecting in %.1fs", exc, delay)
                self._stop.wait(delay)
            finally:
                if connection.is_open:
                    with contextlib.suppress(*BROKER_ERRORS):
                        connection.close()
        self._batches.shutdown(wait=True)


class _Session:
    """One connection's worth of consuming; ends on stop (after draining) or on a broker error."""

    def __init__(self, connection: pika.BlockingConnection, owner: BatchConsumer) -> None:
        self._connection = connection
        self._owner = owner
        self._engine = owner._engine
        self._channel: BlockingChannel = connection.channel()
        self._buffer: list[Delivery] = []
        self._first_at = 0.0
        self._in_flight: list[tuple[list[int], Future[Verdict]]] = []
        self._outstanding: set[int] = set()
        self._paused_until = 0.0
        self._backoff = Backoff()
        self.batches_done = 0

    def serve(self) -> None:
        declare_topology(self._channel, self._owner._queue)
        self._channel.basic_qos(prefetch_count=self._engine.prefetch)
        tag = self._channel.basic_consume(self._owner._queue.queue, self._on_message)
        log.info("consuming from %s", self._owner._queue.queue)
        try:
            while not self._owner._stop.is_set():
                self._connection.process_data_events(time_limit=self._poll_seconds())
                self._start_ready_batch(force=False)
                self._apply_finished(block=False)
        finally:
            self._drain(tag)

    def _poll_seconds(self) -> float:
        """How long to wait for broker events: until the batch deadline while one fills, until
        the pause ends after a requeue, otherwise up to IDLE_POLL_SECONDS. A message arriving or
        a batch finishing (see `_wake_on_finish`) ends the wait at once, so nothing spins."""
        paused = self._paused_until - time.monotonic()
        if paused > 0:
            return min(paused, IDLE_POLL_SECONDS)
        if self._owner._paused():
            return IDLE_POLL_SECONDS
        if self._buffer and len(self._in_flight) < MAX_BATCHES_IN_FLIGHT:
            waited_ms = (time.monotonic() - self._first_at) * 1000
            return max(0.001, (self._engine.batch_wait_ms - waited_ms) / 1000)
        return IDLE_POLL_SECONDS

    def _wake_on_finish(self, future: Future[Verdict]) -> None:
        """Runs on the batch thread when a batch ends: interrupt the consumer's wait for broker
        events, so the verdict is applied and the next batch started without polling."""
        with contextlib.suppress(*BROKER_ERRORS):
            self._connection.add_callback_threadsafe(_nothing)

    def _on_message(
        self, channel: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        if not self._buffer:
            self._first_at = time.monotonic()
        headers = props.headers or {}
        previous = int(headers.get("x-delivery-count", 0) or 0)
        self._buffer.append(Delivery(method.delivery_tag, body, previous))
        self._outstanding.add(method.delivery_tag)

    def _start_ready_batch(self, *, force: bool) -> None:
        if not self._buffer or len(self._in_flight) >= MAX_BATCHES_IN_FLIGHT:
            return
        if not force and (time.monotonic() < self._paused_until or self._owner._paused()):
            return
        full = len(self._buffer) >= self._engine.batch_size
        waited = (time.monotonic() - self._first_at) * 1000 >= self._engine.batch_wait_ms
        if not (force or full or waited):
            return
        batch = self._buffer[: self._engine.batch_size]
        del self._buffer[: self._engine.batch_size]
        if self._buffer:
            self._first_at = time.monotonic()
        future = self._owner._batches.submit(self._owner._process_batch, batch)
        self._in_flight.append(([d.tag for d in batch], future))
        future.add_done_callback(self._wake_on_finish)

    def _apply_finished(self, *, block: bool) -> None:
        still_running = []
        for tags, future in self._in_flight:
            if not block and not future.done():
                still_running.append((tags, future))
                continue
            try:
                verdict = future.result()
            except Exception:
                log.exception("batch failed unexpectedly; requeueing its %d messages", len(tags))
                verdict = Verdict(requeue=list(tags))
            self._apply(verdict)
            self.batches_done += 1
        self._in_flight = still_running

    def _apply(self, verdict: Verdict) -> None:
        self._ack(verdict.ack)
        for tag in verdict.requeue:
            self._channel.basic_nack(tag, requeue=True)
        for tag in verdict.dead_letter:
            self._channel.basic_nack(tag, requeue=False)
        metrics.REQUEUED.inc(len(verdict.requeue))
        self._outstanding.difference_update(verdict.requeue)
        self._outstanding.difference_update(verdict.dead_letter)
        self._owner.completed += verdict.completed
        self._owner.failed += verdict.failed
        self._owner.batches += 1
        if verdict.requeue:
            delay = self._backoff.failed()
            self._paused_until = time.monotonic() + delay
            log.warning("%d messages requeued; pausing %.1fs", len(verdict.requeue), delay)
        else:
            self._backoff.succeeded()

    def _ack(self, tags: list[int]) -> None:
        """Ack with one `multiple=True` frame when the tags are exactly the oldest outstanding."""
        if not tags:
            return
        highest = max(tags)
        if all(t in tags for t in self._outstanding if t <= highest) and len(set(tags)) == sum(
            1 for t in self._outstanding if t <= highest
        ):
            self._channel.basic_ack(highest, multiple=True)
        else:
            for tag in tags:
                self._channel.basic_ack(tag)
        self._outstanding.difference_update(tags)

    def _drain(self, consumer_tag: str) -> None:
        """Stop receiving, process what was already received, commit, ack, return."""
        if not self._connection.is_open:
            self._in_flight_wait_only()
            return
        self._channel.basic_cancel(consumer_tag)
        while self._buffer or self._in_flight:
            self._start_ready_batch(force=True)
            self._connection.process_data_events(time_limit=0.05)
            self._apply_finished(block=False)
        log.info("drained: every received message was processed and acknowledged")

    def _in_flight_wait_only(self) -> None:
        for _, future in self._in_flight:
            future.exception()
