"""The consumer's batching and acknowledgement rules, each test on a RabbitMQ queue of its own.

The consumer runs in-process with a `process_batch` written here, which records the batches it
is given and holds one until the test lets it go; a tap between the consumer and the broker
records every ack and nack frame the broker receives."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple
from urllib.parse import urlsplit

import pika
import pika.frame
import pika.spec
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from common.broker import delete_topology, ensure_topology, queue_depth
from common.config import EngineSettings, QueueSettings
from engine.batch import Delivery, Verdict
from engine.consumer import Backoff, BatchConsumer, ack_frames
from tests.faults import TcpProxy
from tests.support import RABBITMQ_URL, wait_for

# A batch wait no test outlives: a partial batch then starts only when it fills, or on drain.
NEVER_MS = 10 * 60 * 1000
# Longer than any test: the consumer stays paused after a requeue until it is stopped.
FOREVER_SECONDS = 10 * 60.0


# --- the rule for one multiple=True ack, on its own ---------------------------------------------


def test_acking_exactly_the_oldest_outstanding_tags_takes_one_multiple_frame() -> None:
    assert ack_frames([1, 2, 3], {1, 2, 3, 4, 5}) == [(3, True)]
    assert ack_frames([3, 1, 2], {1, 2, 3}) == [(3, True)]


def test_tags_settled_before_do_not_prevent_a_multiple_ack() -> None:
    assert ack_frames([5, 6], {5, 6, 9}) == [(6, True)]


def test_an_older_outstanding_tag_gets_no_ack_and_each_tag_its_own_frame() -> None:
    assert ack_frames([3, 4], {1, 2, 3, 4}) == [(3, False), (4, False)]


def test_an_outstanding_tag_between_the_acked_ones_gets_no_ack() -> None:
    assert ack_frames([1, 3], {1, 2, 3}) == [(1, False), (3, False)]


def test_nothing_to_ack_sends_no_frame() -> None:
    assert ack_frames([], {1, 2}) == []


# --- what the broker receives -------------------------------------------------------------------


class Frame(NamedTuple):
    """An ack or nack as the broker received it; `connection` counts the consumer's
    connections through the tap, from 1."""

    method: str
    tag: int
    multiple: bool = False
    requeue: bool = False
    connection: int = 1


class BrokerTap:
    """Decodes what every client connection sends the broker and keeps its ack and nack
    frames, in the order the broker receives them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames: list[Frame] = []
        self.connections = 0

    def frames(self) -> list[Frame]:
        with self._lock:
            return list(self._frames)

    def acked(self, connection: int = 1) -> set[int]:
        """The delivery tags the acks of one connection cover; a multiple ack covers every
        tag up to its own that had no answer before."""
        covered: set[int] = set()
        answered: set[int] = set()
        for frame in self.frames():
            if frame.connection != connection:
                continue
            if frame.method == "ack" and frame.multiple:
                newly = set(range(1, frame.tag + 1)) - answered
                covered |= newly
                answered |= newly
            else:
                answered.add(frame.tag)
                if frame.method == "ack":
                    covered.add(frame.tag)
        return covered

    def new_connection(self) -> Callable[[bytes], None]:
        with self._lock:
            self.connections += 1
            number = self.connections
        pending = bytearray()

        def sent(chunk: bytes) -> None:
            pending.extend(chunk)
            while True:
                used, frame = pika.frame.decode_frame(bytes(pending))
                if not used:
                    return
                del pending[:used]
                if isinstance(frame, pika.frame.Method):
                    self._keep(number, frame.method)

        return sent

    def _keep(self, connection: int, method: object) -> None:
        if isinstance(method, pika.spec.Basic.Ack):
            frame = Frame("ack", method.delivery_tag, method.multiple, connection=connection)
        elif isinstance(method, pika.spec.Basic.Nack | pika.spec.Basic.Reject):
            kind = "nack" if isinstance(method, pika.spec.Basic.Nack) else "reject"
            multiple = bool(getattr(method, "multiple", False))
            frame = Frame(kind, method.delivery_tag, multiple, method.requeue, connection)
        else:
            return
        with self._lock:
            self._frames.append(frame)


def ack_every(batch: list[Delivery]) -> Verdict:
    return Verdict(ack=[d.tag for d in batch], completed=len(batch))


class ScriptedBatches:
    """The consumer's `process_batch`, written for the test: records each batch and, in `log`,
    when it started and ended; holds a batch whose first message the test gated until released;
    answers with `verdict_for(batch)`."""

    def __init__(self, verdict_for: Callable[[list[Delivery]], Verdict] = ack_every) -> None:
        self._verdict_for = verdict_for
        self._lock = threading.Lock()
        self._gates: dict[bytes, threading.Event] = {}
        self._running = 0
        self.batches: list[list[Delivery]] = []
        self.running_at_start: list[int] = []
        self.log: list[str] = []

    def hold(self, *first_bodies: bytes) -> None:
        for body in first_bodies:
            self._gates[body] = threading.Event()

    def release(self, first_body: bytes) -> None:
        self._gates[first_body].set()

    def release_all(self) -> None:
        for gate in self._gates.values():
            gate.set()

    def note(self, event: str) -> None:
        with self._lock:
            self.log.append(event)

    def bodies(self) -> list[list[bytes]]:
        with self._lock:
            return [[d.body for d in batch] for batch in self.batches]

    def __call__(self, batch: list[Delivery]) -> Verdict:
        first = batch[0].body
        with self._lock:
            self._running += 1
            self.batches.append(batch)
            self.running_at_start.append(self._running)
            self.log.append(f"start {first.decode()}")
        try:
            gate = self._gates.get(first)
            if gate is not None:
                # Bounded only so that a broken consumer cannot hang the suite.
                assert gate.wait(timeout=120), "the test never released this batch"
            return self._verdict_for(batch)
        finally:
            with self._lock:
                self._running -= 1
                self.log.append(f"end {first.decode()}")


@dataclasses.dataclass
class Consuming:
    """A BatchConsumer running on its own thread, reaching RabbitMQ through a tap."""

    consumer: BatchConsumer
    thread: threading.Thread
    tap: BrokerTap
    proxy: TcpProxy
    errors: list[BaseException]

    def stop(self) -> None:
        """Stop and wait until `run()` has returned, i.e. drained."""
        self.consumer.stop()
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "the consumer did not return after stop()"
        assert not self.errors, f"the consumer's run() raised {self.errors!r}"


@contextlib.contextmanager
def consuming(
    queue: QueueSettings,
    batches: ScriptedBatches,
    *,
    batch_size: int,
    batch_wait_ms: int = NEVER_MS,
    requeue_backoff: Callable[[], Backoff] = Backoff,
) -> Iterator[Consuming]:
    tap = BrokerTap()
    broker = urlsplit(queue.url)
    proxy = TcpProxy(broker.port or 5672, broker.hostname or "127.0.0.1", tap=tap.new_connection)
    proxy.start()
    through_tap = broker._replace(
        netloc=f"{broker.username}:{broker.password}@127.0.0.1:{proxy.port}"
    ).geturl()
    engine = EngineSettings(prefetch=64, batch_size=batch_size, batch_wait_ms=batch_wait_ms)
    consumer = BatchConsumer(
        dataclasses.replace(queue, url=through_tap),
        engine,
        batches,
        requeue_backoff=requeue_backoff,
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run()
        except BaseException as exc:
            errors.append(exc)
            raise

    thread = threading.Thread(target=run, name="consumer-under-test", daemon=True)
    thread.start()
    running = Consuming(consumer, thread, tap, proxy, errors)
    try:
        yield running
    finally:
        batches.release_all()
        consumer.stop()
        thread.join(timeout=120)
        proxy.close()
    running.stop()


@contextlib.contextmanager
def broker_channel(queue: QueueSettings) -> Iterator[BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(queue.url))
    try:
        yield connection.channel()
    finally:
        connection.close()


def publish(queue: QueueSettings, bodies: Iterable[bytes]) -> None:
    """Publish persistent messages; returns once the broker has confirmed them all."""
    with broker_channel(queue) as channel:
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish(
                "", queue.queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True
            )


def dead_letters(queue: QueueSettings) -> list[bytes]:
    bodies = []
    with broker_channel(queue) as channel:
        while True:
            method, _, body = channel.basic_get(queue.dead_letter_queue, auto_ack=True)
            if method is None:
                return bodies
            bodies.append(body)


def messages(*numbers: int) -> list[bytes]:
    return [f"m{n}".encode() for n in numbers]


@pytest.fixture
def queue() -> Iterator[QueueSettings]:
    """Job queues (every lane's) and a dead-letter queue of the test's own, deleted afterwards."""
    name = f"pm-consumer-test-{uuid.uuid4().hex[:10]}"
    settings = QueueSettings(url=RABBITMQ_URL, queue=name, dead_letter_queue=f"{name}.dead")
    ensure_topology(settings)
    yield settings
    delete_topology(settings)


# --- batching -----------------------------------------------------------------------------------


def test_batches_are_cut_at_batch_size_and_a_partial_one_waits_for_more(
    queue: QueueSettings,
) -> None:
    batches = ScriptedBatches()
    with consuming(queue, batches, batch_size=4) as running:
        publish(queue, messages(0, 1, 2))
        wait_for(lambda: queue_depth(queue) == 0)
        publish(queue, messages(3, 4, 5, 6, 7))
        wait_for(lambda: running.tap.acked() == set(range(1, 9)))
    assert batches.bodies() == [messages(0, 1, 2, 3), messages(4, 5, 6, 7)]
    assert not [f for f in running.tap.frames() if f.method != "ack"]


def test_a_full_batch_left_over_from_a_burst_starts_without_waiting_out_its_deadline(
    queue: QueueSettings,
) -> None:
    """Eight messages already queued arrive together; after the first batch of four is cut,
    the other four are a full batch too, and start although no further message arrives."""
    batches = ScriptedBatches()
    publish(queue, messages(*range(8)))
    with consuming(queue, batches, batch_size=4) as running:
        wait_for(lambda: running.tap.acked() == set(range(1, 9)))
    assert batches.bodies() == [messages(0, 1, 2, 3), messages(4, 5, 6, 7)]


def test_a_partial_batch_starts_once_its_wait_runs_out(queue: QueueSettings) -> None:
    batches = ScriptedBatches()
    with consuming(queue, batches, batch_size=4, batch_wait_ms=200) as running:
        publish(queue, messages(0))
        wait_for(lambda: running.tap.frames())
    assert batches.bodies() == [messages(0)]
    assert running.tap.frames() == [Frame("ack", 1, multiple=True)]


def test_no_more_than_two_batches_run_at_once(queue: QueueSettings) -> None:
    batches = ScriptedBatches()
    batches.hold(*messages(0, 2, 4))
    publish(queue, messages(0, 1, 2, 3, 4, 5))
    with consuming(queue, batches, batch_size=2) as running:
        wait_for(lambda: len(batches.batches) == 2 and queue_depth(queue) == 0)
        batches.release(b"m0")
        wait_for(lambda: len(batches.batches) == 3)
        batches.release(b"m2")
        batches.release(b"m4")
        wait_for(lambda: running.tap.acked() == set(range(1, 7)))
    assert batches.log[:4] == ["start m0", "start m2", "end m0", "start m4"]
    assert max(batches.running_at_start) == 2
    assert batches.bodies() == [messages(0, 1), messages(2, 3), messages(4, 5)]


# --- acknowledgements ---------------------------------------------------------------------------


def test_a_batch_finishing_before_an_older_one_is_acked_one_frame_per_message(
    queue: QueueSettings,
) -> None:
    """The newer batch must not ack the older one's messages with a multiple ack; once the
    older batch is done, its messages are the oldest outstanding and take one frame."""
    batches = ScriptedBatches()
    batches.hold(*messages(0, 2))
    publish(queue, messages(0, 1, 2, 3))
    with consuming(queue, batches, batch_size=2) as running:
        wait_for(lambda: len(batches.batches) == 2)
        batches.release(b"m2")
        wait_for(lambda: len(running.tap.frames()) == 2)
        assert running.tap.frames() == [Frame("ack", 3), Frame("ack", 4)]
        batches.release(b"m0")
        wait_for(lambda: len(running.tap.frames()) == 3)
    assert running.tap.frames() == [
        Frame("ack", 3),
        Frame("ack", 4),
        Frame("ack", 2, multiple=True),
    ]


def test_requeued_and_dead_lettered_messages_are_nacked_and_the_requeued_one_returns(
    queue: QueueSettings,
) -> None:
    def verdict_for(batch: list[Delivery]) -> Verdict:
        if len(batch) == 1:
            return ack_every(batch)
        first, second, third = (d.tag for d in batch)
        return Verdict(ack=[first], requeue=[second], dead_letter=[third], completed=1, failed=1)

    batches = ScriptedBatches(verdict_for)
    publish(queue, messages(0, 1, 2))
    with consuming(queue, batches, batch_size=3, batch_wait_ms=500) as running:
        wait_for(lambda: len(running.tap.frames()) == 4)
    assert running.tap.frames() == [
        Frame("ack", 1, multiple=True),
        Frame("nack", 2, requeue=True),
        Frame("nack", 3, requeue=False),
        Frame("ack", 4, multiple=True),
    ]
    assert batches.bodies() == [messages(0, 1, 2), messages(1)]
    assert [d.previous_deliveries for d in batches.batches[1]] == [1]
    assert dead_letters(queue) == messages(2)
    counters = running.consumer
    assert (counters.completed, counters.failed, counters.batches) == (2, 1, 2)


def test_no_batch_starts_while_the_consumer_pauses_after_a_requeue(queue: QueueSettings) -> None:
    """With a pause longer than the test, the returned message and a new one are received but
    only processed by the drain on stop."""

    def verdict_for(batch: list[Delivery]) -> Verdict:
        if batch[0].previous_deliveries == 0 and batch[0].body == b"m0":
            return Verdict(requeue=[batch[0].tag])
        return ack_every(batch)

    batches = ScriptedBatches(verdict_for)
    publish(queue, messages(0))

    def paused() -> Backoff:
        return Backoff(first=FOREVER_SECONDS, cap=FOREVER_SECONDS)

    with consuming(queue, batches, batch_size=1, requeue_backoff=paused) as running:
        wait_for(lambda: running.tap.frames() == [Frame("nack", 1, requeue=True)])
        publish(queue, messages(1))
        wait_for(lambda: queue_depth(queue) == 0)
        batches.note("stop")
        running.stop()
    assert batches.log[:3] == ["start m0", "end m0", "stop"]
    assert sorted(batches.bodies()[1:]) == [messages(0), messages(1)]
    assert running.tap.acked() == {2, 3}


# --- stopping and reconnecting ------------------------------------------------------------------


def test_stop_processes_and_acks_every_received_message_before_returning(
    queue: QueueSettings,
) -> None:
    batches = ScriptedBatches()
    batches.hold(b"m0")
    publish(queue, messages(0, 1, 2, 3, 4, 5))
    with consuming(queue, batches, batch_size=4) as running:
        wait_for(lambda: len(batches.batches) == 1 and queue_depth(queue) == 0)
        running.consumer.stop()
        batches.release(b"m0")
        running.stop()
        assert running.tap.acked() == set(range(1, 7))
    assert batches.bodies() == [messages(0, 1, 2, 3), messages(4, 5)]
    assert not [f for f in running.tap.frames() if f.method != "ack"]
    assert queue_depth(queue) == 0


def test_after_the_connection_drops_the_consumer_reconnects_and_acks_on_the_new_one(
    queue: QueueSettings,
) -> None:
    """The batch running when the connection dropped ends on the old session; its messages
    come back, are processed again and acked on the new connection, never on the old."""
    batches = ScriptedBatches()
    batches.hold(b"m0")
    publish(queue, messages(0, 1))
    with consuming(queue, batches, batch_size=2) as running:
        wait_for(lambda: len(batches.batches) == 1)
        running.proxy.pause()
        wait_for(lambda: queue_depth(queue) == 2)
        running.proxy.resume()
        batches.release(b"m0")
        wait_for(lambda: running.tap.acked(connection=2) == {1, 2})
        publish(queue, messages(2, 3))
        wait_for(lambda: running.tap.acked(connection=2) == {1, 2, 3, 4})
    assert batches.bodies() == [messages(0, 1), messages(0, 1), messages(2, 3)]
    assert [d.previous_deliveries for d in batches.batches[1]] == [1, 1]
    assert running.tap.connections == 2
    assert running.tap.acked(connection=1) == set()
    assert running.consumer.batches == 2
