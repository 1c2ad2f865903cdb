"""No image stays unfinished because its job was dead-lettered: the worker node's reaper ends it
`failed` with the reason, after a grace period, and leaves everything else in the queue alone."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import psycopg
import pytest

from common.broker import JobPublisher, declare_topology, route
from common.cache import ImageCache
from common.config import Settings
from common.jobs import JobMessage
from db import images
from db.images import NewImage
from db.pool import Database
from engine.dead_letters import DeadLetterReaper
from tests.support import start_worker, stop_worker, wait_for


@pytest.fixture
def own_queue(private_queue: Settings) -> Settings:
    """A private queue pair whose jobs die after two deliveries."""
    own = dataclasses.replace(
        private_queue, queue=dataclasses.replace(private_queue.queue, delivery_limit=2)
    )
    with _channel(own) as channel:
        declare_topology(channel, own.queue)
    return own


class _channel:
    def __init__(self, settings: Settings) -> None:
        self._connection = pika.BlockingConnection(pika.URLParameters(settings.queue.url))

    def __enter__(self) -> pika.adapters.blocking_connection.BlockingChannel:
        return self._connection.channel()

    def __exit__(self, *exc: object) -> None:
        self._connection.close()


def _new_images(settings: Settings, count: int) -> list[uuid.UUID]:
    news = [
        NewImage(i, "dead-letter-test", "a.jpg", "image/jpeg", 10, "x", 4, 4, f"originals/{i}")
        for i in (uuid.uuid4() for _ in range(count))
    ]
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        images.insert_images(conn, news)
    return [n.id for n in news]


def _set_status(
    settings: Settings, image_id: uuid.UUID, status: str, error: str | None = None
) -> None:
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE images SET status = %s, error = %s WHERE id = %s", (status, error, image_id)
        )


def _row(settings: Settings, image_id: uuid.UUID) -> tuple[str, str | None]:
    with psycopg.connect(settings.postgres_url) as conn:
        row = conn.execute("SELECT status, error FROM images WHERE id = %s", (image_id,)).fetchone()
    assert row is not None
    return row[0], row[1]


def _depth(settings: Settings, queue: str) -> int:
    with _channel(settings) as channel:
        return int(channel.queue_declare(queue, passive=True).method.message_count)


def _dead_letter(settings: Settings, image_ids: list[uuid.UUID]) -> None:
    """Really dead-letter one job per image: publish, take, reject without requeue."""
    jobs = [JobMessage(i, "test") for i in image_ids]
    publisher = JobPublisher(settings.queue)
    publisher.publish(jobs)
    publisher.close()
    with _channel(settings) as channel:
        for job in jobs:
            method, _, _ = channel.basic_get(route(settings.queue, job))
            channel.basic_nack(method.delivery_tag, requeue=False)
    dlq = settings.queue.dead_letter_queue
    wait_for(lambda: _depth(settings, dlq) == len(image_ids), timeout=10)


@contextlib.contextmanager
def _reaper(settings: Settings, grace_seconds: float) -> Iterator[DeadLetterReaper]:
    db = Database(settings.postgres_url, max_size=1)
    cache = ImageCache.from_url(settings.redis_url, settings.redis_prefix)
    try:
        yield DeadLetterReaper(db, cache, settings.queue, grace_seconds=grace_seconds)
    finally:
        db.close()
        cache.client.close()


def test_reaper_fails_unfinished_images_of_dead_letters_and_leaves_the_rest(
    own_queue: Settings,
) -> None:
    pending, processing, finished = _new_images(own_queue, 3)
    _set_status(own_queue, processing, "processing")
    _set_status(own_queue, finished, "failed", "not a JPEG")
    _dead_letter(own_queue, [pending, processing, finished])
    with _channel(own_queue) as channel:
        channel.basic_publish("", own_queue.queue.dead_letter_queue, b"not a job")
    dlq = own_queue.queue.dead_letter_queue

    with _reaper(own_queue, grace_seconds=3600) as reaper:
        assert reaper.reap_once() == 0  # every dead letter is younger than an hour
    wait_for(lambda: _depth(own_queue, dlq) == 4, timeout=10)
    assert _row(own_queue, pending) == ("pending", None)

    with _reaper(own_queue, grace_seconds=0) as reaper:
        assert reaper.reap_once() == 2

    assert _row(own_queue, pending) == ("failed", "dead-lettered: rejected")
    assert _row(own_queue, processing) == ("failed", "dead-lettered: rejected")
    assert _row(own_queue, finished) == ("failed", "not a JPEG")
    # The malformed message stays for an operator; the others are gone.
    wait_for(lambda: _depth(own_queue, dlq) == 1, timeout=10)
    assert _depth(own_queue, own_queue.queue.queue) == 0


def _with_lock_timeout(url: str, milliseconds: int) -> str:
    """`url` whose sessions give up waiting for a row lock after `milliseconds`, keeping any
    session options it already sets (the test schema's search path)."""
    option = f"-clock_timeout%3D{milliseconds}"
    if "options=" in url:
        return url.replace("options=", f"options={option}%20", 1)
    return f"{url}{'&' if '?' in url else '?'}options={option}"


@pytest.mark.slow
def test_an_image_whose_claim_fails_on_every_delivery_ends_failed_without_an_operator(
    env: dict[str, str], own_queue: Settings, tmp_path: Path
) -> None:
    """The image's row stays locked while its job uses up its deliveries: every claim gives up
    waiting for the lock while PostgreSQL itself answers, so the failure is the image's own (an
    unreachable database would pause the node instead) and the batch pipeline cannot record a
    give-up; once the lock is gone the image still ends failed."""
    node_env = {
        **env,
        "POSTGRES_URL": _with_lock_timeout(env["POSTGRES_URL"], milliseconds=500),
        "RABBITMQ_QUEUE": own_queue.queue.queue,
        "RABBITMQ_DEAD_LETTER_QUEUE": own_queue.queue.dead_letter_queue,
        "REDIS_PREFIX": own_queue.redis_prefix,
        "RABBITMQ_DELIVERY_LIMIT": "2",
        "RABBITMQ_DEAD_LETTER_GRACE_SECONDS": "0",
    }
    log = tmp_path / "worker.log"
    node = start_worker(node_env, log)
    holder = psycopg.connect(own_queue.postgres_url)
    try:
        wait_for(lambda: log.exists() and b"consuming from" in log.read_bytes(), timeout=60)
        [image_id] = _new_images(own_queue, 1)
        holder.execute("SELECT 1 FROM images WHERE id = %s FOR UPDATE", (image_id,))
        publisher = JobPublisher(own_queue.queue)
        publisher.publish([JobMessage(image_id, "test")])
        publisher.close()
        dlq = own_queue.queue.dead_letter_queue
        wait_for(lambda: _depth(own_queue, dlq) == 1, timeout=120, interval=0.5)
        assert _row(own_queue, image_id) == ("pending", None)

        holder.rollback()

        wait_for(lambda: _row(own_queue, image_id)[0] == "failed", timeout=60, interval=0.5)
        _, error = _row(own_queue, image_id)
        assert error is not None and error.startswith("dead-lettered: ")
        wait_for(lambda: _depth(own_queue, dlq) == 0, timeout=30)
        assert b"unreachable: pausing" not in log.read_bytes(), "the database was taken for down"
    finally:
        holder.close()
        stop_worker(node)
