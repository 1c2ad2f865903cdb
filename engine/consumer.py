"""The consumer: the one thread that talks to RabbitMQ.

It prefetches job messages from every job queue (the lanes, see `common.broker.job_queues`),
groups them into batches (interactive work first and at once; bulk work up to `batch_size`
messages or `batch_wait_ms` after the first, its shards in turn), hands each batch to a batch
thread, and applies the verdicts (ack, requeue, dead-letter) when they come back. pika's
connection is not thread-safe, so every channel operation happens here; the loop keeps serving
heartbeats while batches run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from common.broker import (
    BROKER_ERRORS,
    JobQueue,
    connection_parameters,
    declare_topology,
    job_queues,
)
from common.config import EngineSettings, QueueSettings
from common.jobs import INTERACTIVE
from engine import metrics
from engine.batch import Delivery, Verdict

log = logging.getLogger(__name__)

MAX_BATCHES_IN_FLIGHT = 2
# One more batch may run when it is interactive work: it never waits for a bulk batch to end.
INTERACTIVE_EXTRA_BATCHES = 1
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


def ack_frames(tags: Sequence[int], outstanding: Collection[int]) -> list[tuple[int, bool]]:
    """The `basic.ack` frames, as (delivery tag, multiple), that acknowledge exactly `tags`.

    A `multiple=True` ack of the highest tag also acknowledges every outstanding delivery below
    it, so one such frame is sent only when `tags` are exactly the oldest outstanding deliveries
    (no older one is still waiting for its verdict); otherwise each tag gets a frame of its own.
    `outstanding` holds every delivery received on the channel and not yet acked or rejected.
    """
    if not tags:
        return []
    highest = max(tags)
    if set(tags) == {tag for tag in outstanding if tag <= highest}:
        return [(highest, True)]
    return [(tag, False) for tag in tags]


@dataclass
class ConsumerCounters:
    """What the node reports in its heartbeat. Only the consumer thread writes them."""

    completed: int = 0
    failed: int = 0
    batches: int = 0

    def count(self, verdict: Verdict) -> None:
        self.completed += verdict.completed
        self.failed += verdict.failed
        self.batches += 1


class BatchConsumer:
    """Turns a stream of deliveries into batches and their verdicts into acks.

    It owns the connection (reopened with a backoff after a broker error), the batch threads and
    the counters; each connection's consuming is one `_Session`, given what it uses.
    `requeue_backoff` makes each session's backoff for the pause after a requeue.
    """

    def __init__(
        self,
        queue: QueueSettings,
        engine: EngineSettings,
        process_batch: Callable[[list[Delivery]], Verdict],
        *,
        requeue_backoff: Callable[[], Backoff] = Backoff,
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        """`paused()` is true while a dependency the batches need is down: no batch is started
        then, and the received messages wait unacknowledged (see `engine.dependencies`)."""
        self._queue = queue
        self._paused = paused
        self._engine = engine
        self._process_batch = process_batch
        self._requeue_backoff = requeue_backoff
        self._batches = ThreadPoolExecutor(
            MAX_BATCHES_IN_FLIGHT + INTERACTIVE_EXTRA_BATCHES, thread_name_prefix="batch"
        )
        self._stop = threading.Event()
        self._counters = ConsumerCounters()

    @property
    def completed(self) -> int:
        return self._counters.completed

    @property
    def failed(self) -> int:
        return self._counters.failed

    @property
    def batches(self) -> int:
        return self._counters.batches

    def stop(self) -> None:
        """Ask the loop to drain: stop receiving, finish and commit what was received, return."""
        self._stop.set()

    def run(self) -> None:
        """Consume until `stop()`, reconnecting after broker errors; returns once drained."""
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                connection = pika.BlockingConnection(connection_parameters(self._queue))
            except BROKER_ERRORS as exc:
                delay = backoff.failed()
                log.warning("cannot reach RabbitMQ (%s); retrying in %.1fs", exc, delay)
                self._stop.wait(delay)
                continue
            try:
                self._serve(connection, backoff)
            finally:
                if connection.is_open:
                    with contextlib.suppress(*BROKER_ERRORS):
                        connection.close()
        self._batches.shutdown(wait=True)

    def _serve(self, connection: pika.BlockingConnection, backoff: Backoff) -> None:
        """One session on `connection`; after a broker error, wait before the next connection
        (a session that finished batches counts as a success, so the wait starts short)."""
        session: _Session | None = None
        try:
            session = _Session(
                connection,
                self._queue,
                self._engine,
                self._start_batch,
                self._counters,
                self._requeue_backoff(),
                self._paused,
            )
            session.serve(self._stop)
        except BROKER_ERRORS as exc:
            if session is not None and session.batches_done:
                backoff.succeeded()
            delay = backoff.failed()
            log.warning("lost RabbitMQ channel (%s); reconnecting in %.1fs", exc, delay)
            self._stop.wait(delay)

    def _start_batch(self, deliveries: list[Delivery]) -> Future[Verdict]:
        return self._batches.submit(self._process_batch, deliveries)


class _FillingBatch:
    """Deliveries received and not yet handed to a batch, kept by the queue they came from.

    Sources are numbered in the order `job_queues` lists them (interactive first, then the bulk
    shards and the base queue). The next batch is interactive work only, whenever some is held,
    and due at once; otherwise it takes the other sources in turn, one delivery each round and
    starting from a different source each batch (two owners' backlogs are served alongside each
    other, and jobs in the base queue get their turn too); such a batch is due once `size`
    deliveries are here, or `wait_seconds` after it began filling.
    """

    def __init__(self, size: int, wait_seconds: float, *, urgent: int | None = None) -> None:
        self._size = size
        self._wait_seconds = wait_seconds
        # The source whose work starts first (interactive).
        self._urgent = urgent
        self._held: dict[int, deque[Delivery]] = {}
        self._next_turn = 0
        self._since = 0.0

    def __bool__(self) -> bool:
        return any(self._held.values())

    def __len__(self) -> int:
        return sum(len(held) for held in self._held.values())

    def add(self, delivery: Delivery, now: float, source: int = 0) -> None:
        if not self:
            self._since = now
        self._held.setdefault(source, deque()).append(delivery)

    @property
    def urgent_waiting(self) -> bool:
        """Whether the next batch is interactive work."""
        return self._urgent is not None and bool(self._held.get(self._urgent))

    def seconds_until_due(self, now: float) -> float:
        """Until the batch is due: zero with interactive work or once full, else until its
        wait runs out."""
        if self.urgent_waiting or len(self) >= self._size:
            return 0.0
        return self._since + self._wait_seconds - now

    def due(self, now: float) -> bool:
        return self.seconds_until_due(now) <= 0

    def take(self, now: float) -> list[Delivery]:
        """The next batch (see the class); what is left begins filling the next one now."""
        if self.urgent_waiting:
            assert self._urgent is not None
            batch = _take_in_turn([self._held[self._urgent]], self._size)
        else:
            batch = _take_in_turn(self._shards_in_turn(), self._size)
            self._next_turn += 1
        if self:
            self._since = now
        return batch

    def _shards_in_turn(self) -> list[deque[Delivery]]:
        shards = sorted(s for s in self._held if s != self._urgent)
        if not shards:
            return []
        first = self._next_turn % len(shards)
        return [self._held[s] for s in shards[first:] + shards[:first]]


def _take_in_turn(sources: list[deque[Delivery]], count: int) -> list[Delivery]:
    """Up to `count` deliveries, one from each source in turn, oldest first within each."""
    taken: list[Delivery] = []
    while len(taken) < count and any(sources):
        for source in sources:
            if source and len(taken) < count:
                taken.append(source.popleft())
    return taken


class _Running(NamedTuple):
    tags: list[int]
    verdict: Future[Verdict]


class _Session:
    """One connection's worth of consuming: receives deliveries, starts batches and applies
    their verdicts on this connection's channel (delivery tags mean nothing on another).
    Ends on stop, after draining, or on a broker error."""

    def __init__(
        self,
        connection: pika.BlockingConnection,
        queue: QueueSettings,
        engine: EngineSettings,
        start_batch: Callable[[list[Delivery]], Future[Verdict]],
        counters: ConsumerCounters,
        requeue_backoff: Backoff,
        dependency_down: Callable[[], bool],
    ) -> None:
        """`dependency_down()` is true while a dependency the batches need is down: no batch is
        started then, and the received messages wait unacknowledged (see `engine.dependencies`)."""
        self._connection = connection
        self._dependency_down = dependency_down
        self._channel: BlockingChannel = connection.channel()
        self._queue = queue
        self._sources = job_queues(queue)
        self._engine = engine
        self._start_batch = start_batch
        self._counters = counters
        self._requeue_backoff = requeue_backoff
        lanes = [q.lane for q in self._sources]
        self._filling = _FillingBatch(
            engine.batch_size,
            engine.batch_wait_ms / 1000,
            urgent=lanes.index(INTERACTIVE),
        )
        self._running: list[_Running] = []
        # Received and neither acked nor rejected yet: what a `multiple` ack must not cover.
        self._outstanding: set[int] = set()
        self._paused_until = 0.0
        self.batches_done = 0

    def serve(self, stop: threading.Event) -> None:
        declare_topology(self._channel, self._queue)
        consumer_tags = [
            self._consume(number, source) for number, source in enumerate(self._sources)
        ]
        log.info("consuming from %s", ", ".join(q.name for q in self._sources))
        try:
            while not stop.is_set():
                self._connection.process_data_events(time_limit=self._poll_seconds())
                self._start_ready_batch(force=False)
                self._apply_finished()
        finally:
            self._drain(consumer_tags)

    def _consume(self, number: int, source: JobQueue) -> str:
        """Consume `source` with a prefetch of its own (per consumer, not per channel): one batch
        of interactive work, so a node never holds more of it than it starts next; WORKER_PREFETCH
        for each bulk shard and the base queue, so one busy shard alone keeps batches flowing."""
        prefetch = self._engine.batch_size if source.lane == INTERACTIVE else self._engine.prefetch
        self._channel.basic_qos(prefetch_count=prefetch, global_qos=False)
        on_message = functools.partial(self._on_message, source=number)
        return self._channel.basic_consume(source.name, on_message)

    def _batch_slots(self) -> int:
        """Batches that may run now: one more when the next one is interactive work."""
        extra = INTERACTIVE_EXTRA_BATCHES if self._filling.urgent_waiting else 0
        return MAX_BATCHES_IN_FLIGHT + extra

    def _poll_seconds(self) -> float:
        """How long to wait for broker events: until the filling batch is due (at once when full),
        until the pause ends after a requeue, otherwise up to IDLE_POLL_SECONDS. A message or
        a batch finishing (see `_wake_on_finish`) ends the wait at once, so nothing spins."""
        now = time.monotonic()
        paused = self._paused_until - now
        if paused > 0:
            return min(paused, IDLE_POLL_SECONDS)
        if self._filling and len(self._running) < self._batch_slots():
            if self._dependency_down():
                return IDLE_POLL_SECONDS
            return max(0.001, self._filling.seconds_until_due(now))
        return IDLE_POLL_SECONDS

    def _wake_on_finish(self, future: Future[Verdict]) -> None:
        """Runs on the batch thread when a batch ends: interrupt the consumer's wait for broker
        events, so the verdict is applied and the next batch started without polling."""
        with contextlib.suppress(*BROKER_ERRORS):
            self._connection.add_callback_threadsafe(_nothing)

    def _on_message(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        props: BasicProperties,
        body: bytes,
        *,
        source: int,
    ) -> None:
        headers = props.headers or {}
        previous = int(headers.get("x-delivery-count", 0) or 0)
        delivery = Delivery(method.delivery_tag, body, previous)
        self._filling.add(delivery, time.monotonic(), source)
        self._outstanding.add(method.delivery_tag)

    def _start_ready_batch(self, *, force: bool) -> None:
        """Start one batch if a slot is free and the batch is due; `force` (draining) starts it
        even when it is not full yet or the consumer is pausing after a requeue."""
        if not self._filling or len(self._running) >= self._batch_slots():
            return
        now = time.monotonic()
        if not force and (
            now < self._paused_until or self._dependency_down() or not self._filling.due(now)
        ):
            return
        batch = self._filling.take(now)
        future = self._start_batch(batch)
        self._running.append(_Running([d.tag for d in batch], future))
        future.add_done_callback(self._wake_on_finish)

    def _apply_finished(self) -> None:
        """Apply the verdicts of finished batches, oldest first."""
        still_running = []
        for running in self._running:
            if not running.verdict.done():
                still_running.append(running)
                continue
            try:
                verdict = running.verdict.result()
            except Exception:
                log.exception(
                    "batch failed unexpectedly; requeueing its %d messages", len(running.tags)
                )
                verdict = Verdict(requeue=list(running.tags))
            self._apply(verdict)
            self.batches_done += 1
        self._running = still_running

    def _apply(self, verdict: Verdict) -> None:
        self._ack(verdict.ack)
        for tag in verdict.requeue:
            self._channel.basic_nack(tag, requeue=True)
        for tag in verdict.dead_letter:
            self._channel.basic_nack(tag, requeue=False)
        metrics.REQUEUED.inc(len(verdict.requeue))
        self._outstanding.difference_update(verdict.requeue)
        self._outstanding.difference_update(verdict.dead_letter)
        self._counters.count(verdict)
        if verdict.requeue:
            delay = self._requeue_backoff.failed()
            self._paused_until = time.monotonic() + delay
            log.warning("%d messages requeued; pausing %.1fs", len(verdict.requeue), delay)
        else:
            self._requeue_backoff.succeeded()

    def _ack(self, tags: list[int]) -> None:
        for tag, multiple in ack_frames(tags, self._outstanding):
            self._channel.basic_ack(tag, multiple=multiple)
        self._outstanding.difference_update(tags)

    def _drain(self, consumer_tags: list[str]) -> None:
        """Stop receiving, process what was already received, commit, ack, return. With the
        connection gone, only wait for the running batches: the broker redelivers their
        messages, and their tags cannot be acked on another connection."""
        if not self._connection.is_open:
            for running in self._running:
                running.verdict.exception()
            return
        for consumer_tag in consumer_tags:
            self._channel.basic_cancel(consumer_tag)
        while self._filling or self._running:
            self._start_ready_batch(force=True)
            self._connection.process_data_events(time_limit=0.05)
            self._apply_finished()
        log.info("drained: every received message was processed and acknowledged")
