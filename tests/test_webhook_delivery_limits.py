"""What a receiver cannot do to webhook delivery: hold an attempt past its deadline however
slowly it answers, make an attempt read more than a response head's worth, hold more than a few
of a node's senders, delay another owner's events, or keep a node from stopping. A slow DNS
answer is cut off at the same deadline.

The hostile receivers are sockets on 127.0.0.1 that trickle a response head that never ends, a
byte at a time, until the test lets go: how long they hold a sender is set by the test, not by
the machine's speed."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from common.config import Settings
from db.pool import Database
from db.webhook_deliveries import DueCandidate
from engine.webhooks import PER_OWNER, PER_TARGET, InFlight, WebhookDeliverer, choose_fairly
from tests.support import (
    Receiver,
    TricklingReceiver,
    api_for,
    close_batch,
    create_batch,
    deliverer_on,
    wait_for,
)


def with_timeout(settings: Settings, seconds: float) -> Settings:
    return dataclasses.replace(
        settings, webhooks=dataclasses.replace(settings.webhooks, timeout_seconds=seconds)
    )


def deliveries(settings: Settings) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.postgres_url) as conn:
        return conn.execute(
            """SELECT attempts, delivered_at IS NOT NULL, last_error
                 FROM webhook_deliveries ORDER BY created_at"""
        ).fetchall()


def finished_batch(settings: Settings, issuer: Any, owner: str, url: str) -> str:
    """A batch of `owner`'s, closed while empty: its `batch.finished` event is due at once."""
    with api_for(settings, issuer.mint_token(owner)) as api:
        batch = create_batch(api, callback_url=url)
        close_batch(api, batch["id"])
    return str(batch["id"])


def in_thread(work: Any) -> threading.Event:
    """Runs `work()` in a daemon thread; the event is set once it has returned."""
    done = threading.Event()

    def run() -> None:
        try:
            work()
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


@pytest.fixture
def trickling() -> Iterator[TricklingReceiver]:
    receiver = TricklingReceiver(interval=0.2)
    yield receiver
    receiver.release()


@pytest.fixture
def fast_receiver() -> Iterator[Receiver]:
    served = Receiver()
    served.thread.start()
    yield served
    served.server.shutdown()
    served.server.server_close()


def test_an_attempt_ends_at_its_deadline_however_slowly_the_receiver_answers(
    own_database: Settings, trickling: TricklingReceiver, issuer: Any, user_id: str
) -> None:
    # Every byte arrives well inside any per-read timeout; only a deadline ends the attempt.
    settings = with_timeout(own_database, 1.0)
    finished_batch(settings, issuer, user_id, trickling.url())
    with deliverer_on(settings) as deliverer:
        attempted = in_thread(deliverer.deliver_once)
        wait_for(attempted.is_set, timeout=60)
    assert deliveries(settings) == [(1, False, "timed out")]
    # The sender hung up; the receiver would have trickled on.
    wait_for(lambda: trickling.hung_up == 1, timeout=60)
    assert trickling.accepted == 1


def read_request(conn: socket.socket) -> bytes:
    """One whole request (head and `Content-Length` body), so that closing sends no reset."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += conn.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += conn.recv(65536)
    return received


class HugeHead:
    """An endpoint answering `200 OK` at once with 40 headers of 16 KiB each (640 KiB of head)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                read_request(conn)
                head = b"HTTP/1.1 200 OK\r\n" + b"".join(
                    f"X-Pad-{i}: ".encode() + b"a" * 16384 + b"\r\n" for i in range(40)
                )
                with contextlib.suppress(OSError):
                    conn.sendall(head + b"Content-Length: 0\r\n\r\n")


def test_a_response_head_over_its_limit_is_a_failed_attempt_not_read_to_its_end(
    own_database: Settings, issuer: Any, user_id: str
) -> None:
    receiver = HugeHead()
    try:
        finished_batch(own_database, issuer, user_id, f"http://127.0.0.1:{receiver.port}/hook")
        with deliverer_on(own_database) as deliverer:
            assert deliverer.deliver_once() == 1
    finally:
        receiver.listener.close()
    [(attempts, delivered, error)] = deliveries(own_database)
    assert (attempts, delivered) == (1, False)
    assert "response head is over" in error


def test_a_trickling_receiver_holds_few_senders_and_another_owners_event_still_arrives(
    own_database: Settings, issuer: Any, fast_receiver: Receiver
) -> None:
    # Alice's receiver holds each attempt for as long as the test likes (the deadline is an
    # hour away); she has more finished batches than a node has senders.
    settings = with_timeout(own_database, 3600)
    slow = TricklingReceiver(interval=2.0)
    alice, bob = f"alice-{uuid.uuid4()}", f"bob-{uuid.uuid4()}"
    for _ in range(10):
        finished_batch(settings, issuer, alice, slow.url())
    bobs = finished_batch(settings, issuer, bob, fast_receiver.url())
    db = Database(settings.postgres_url)
    deliverer = WebhookDeliverer(db, settings.webhooks)
    deliverer.start()
    try:
        wait_for(lambda: fast_receiver.events(), timeout=60)
        [event] = fast_receiver.events()
        assert (event["type"], event["data"]["id"]) == ("batch.finished", bobs)
        # Bob's event came while Alice's receiver still held every attempt it was given.
        assert slow.hung_up == 0
        assert 1 <= slow.held <= PER_OWNER
    finally:
        slow.release()
        stopped = in_thread(deliverer.stop)
        wait_for(stopped.is_set, timeout=60)
        db.close()


def test_a_node_stops_without_waiting_on_a_receiver_past_the_deadline(
    own_database: Settings, trickling: TricklingReceiver, issuer: Any, user_id: str
) -> None:
    settings = with_timeout(own_database, 2.0)
    for _ in range(3):
        finished_batch(settings, issuer, user_id, trickling.url())
    db = Database(settings.postgres_url)
    deliverer = WebhookDeliverer(db, settings.webhooks)
    deliverer.start()
    try:
        wait_for(lambda: trickling.accepted >= 1, timeout=60)
        stopped = in_thread(deliverer.stop)
        # The receiver trickles on: only the attempts' deadline lets the node stop.
        wait_for(stopped.is_set, timeout=60)
        wait_for(lambda: trickling.held == 0, timeout=60)
    finally:
        db.close()
    assert all(not delivered for _, delivered, _ in deliveries(settings))


def test_a_host_that_does_not_resolve_within_the_deadline_fails_the_attempt_in_time(
    own_database: Settings, issuer: Any, user_id: str
) -> None:
    strict = dataclasses.replace(
        own_database,
        webhooks=dataclasses.replace(
            own_database.webhooks, allow_private=False, timeout_seconds=1.0
        ),
    )
    finished_batch(strict, issuer, user_id, "https://hooks.example.com/hook")
    answer = threading.Event()

    def resolver_that_hangs(host: str, port: int) -> list[str]:
        answer.wait(120)  # a DNS server that never answers, until the test ends
        return ["93.184.216.34"]

    try:
        with deliverer_on(strict, resolve=resolver_that_hangs) as deliverer:
            attempted = in_thread(deliverer.deliver_once)
            wait_for(attempted.is_set, timeout=60)
    finally:
        answer.set()
    [(attempts, delivered, error)] = deliveries(strict)
    assert (attempts, delivered) == (1, False)
    assert "did not resolve in time" in error


def due(owner: str, host: str) -> DueCandidate:
    return DueCandidate(uuid.uuid4(), owner, f"https://{host}/hook")


def test_due_events_are_chosen_round_robin_between_owners_within_their_limits() -> None:
    alice = [due("alice", f"a{i}.example") for i in range(5)]
    bob = [due("bob", "b.example")]
    carol = [due("carol", "c.example") for _ in range(3)]
    chosen = choose_fairly(alice + carol + bob, InFlight(Counter(), Counter()), free=8)
    assert [c.owner for c in chosen] == ["alice", "carol", "bob", "alice", "carol"]
    assert chosen[0] is alice[0] and chosen[3] is alice[1], "each owner's oldest first"
    assert PER_OWNER == 2


def test_a_receiver_at_its_limit_gets_no_more_whoever_sends_to_it() -> None:
    busy = InFlight(Counter({"alice": 1}), Counter({"https://slow.example:443": PER_TARGET}))
    slow = [due(owner, "slow.example") for owner in ("alice", "bob", "carol")]
    elsewhere = due("bob", "fast.example")
    chosen = choose_fairly([*slow, elsewhere], busy, free=8)
    assert chosen == [elsewhere]
    assert busy.owners == Counter({"alice": 1, "bob": 1})


def test_no_more_are_chosen_than_senders_are_free() -> None:
    many = [due(f"user-{i}", f"h{i}.example") for i in range(20)]
    assert len(choose_fairly(many, InFlight(Counter(), Counter()), free=3)) == 3
