"""Lanes and fair share: which lane and shard each request's images get, that whoever publishes a
job again sends it there, and that a node starts interactive work before a bulk backlog and
serves two bulk owners alongside each other. Each test has job queues of its own."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import psycopg
import pytest
import redis

from common.broker import JobPublisher, declare_topology, job_queues, queue_depth, route
from common.config import Settings
from common.jobs import BULK, INTERACTIVE, JobMessage, bulk_shard, choose_lane
from common.storage import ObjectStore
from db import images
from db.images import NewImage
from db.pool import Database
from engine.batch import Delivery
from engine.consumer import _FillingBatch
from engine.outbox import OutboxSweeper
from ingest.intake import ImageIntake
from ingest.upload_reader import BulkPart, validate_image
from ops.dlq import Selection, requeue_dead_letters
from ops.scale import Autoscaler, Bounds
from ops.status import collect_status
from tests.support import jpeg, start_worker, stop_worker, wait_for

# Each batch of the node lasts at least this long: bulk work drains slowly by construction.
HOLD_SECONDS = 1.0
BATCH_SIZE = 4


# --- the rule -----------------------------------------------------------------------------------


def test_single_uploads_and_small_bulk_requests_are_interactive_larger_ones_bulk() -> None:
    assert choose_lane(None, 4) == INTERACTIVE
    assert choose_lane(1, 4) == INTERACTIVE
    assert choose_lane(4, 4) == INTERACTIVE
    assert choose_lane(5, 4) == BULK
    assert choose_lane(1, 0) == BULK
    assert choose_lane(None, 0) == INTERACTIVE


def test_an_owner_always_gets_the_same_bulk_shard_and_owners_spread_over_all_shards() -> None:
    owners = [f"user-{n}" for n in range(200)]
    assert [bulk_shard(o, 4) for o in owners] == [bulk_shard(o, 4) for o in owners]
    assert {bulk_shard(o, 4) for o in owners} == {0, 1, 2, 3}


def test_a_job_message_from_before_lanes_reads_as_bulk_and_an_unknown_lane_is_refused() -> None:
    image_id = uuid.uuid4()
    old = json.dumps({"image_id": str(image_id), "request_id": "r"}).encode()
    assert JobMessage.decode(old) == JobMessage(image_id, "r", BULK, 0)
    job = JobMessage(image_id, "r", INTERACTIVE, 0)
    assert JobMessage.decode(job.encode()) == job
    with pytest.raises(ValueError):
        JobMessage.decode(json.dumps({"image_id": str(image_id), "lane": "vip"}).encode())


# --- which deliveries form the next batch (sources: 0 interactive, 1-2 bulk shards, 3 base) ----


def _filling(size: int = 4) -> _FillingBatch:
    return _FillingBatch(size, wait_seconds=60.0, urgent=0)


def _held(filling: _FillingBatch, source: int, *tags: int) -> None:
    for tag in tags:
        filling.add(Delivery(tag, b""), now=0.0, source=source)


def _tags(batch: list[Delivery]) -> list[int]:
    return [d.tag for d in batch]


def test_held_interactive_work_is_the_next_batch_alone_and_due_at_once() -> None:
    filling = _filling()
    _held(filling, 1, 10, 11, 12)
    assert not filling.due(now=0.0)  # bulk work waits to fill
    _held(filling, 0, 20)

    assert filling.due(now=0.0)
    assert _tags(filling.take(now=0.0)) == [20]
    assert not filling.due(now=0.0)


def test_bulk_batches_take_the_shards_in_turn_starting_from_another_shard_each_time() -> None:
    filling = _filling()
    _held(filling, 1, 10, 11, 12, 13, 14, 15, 16, 17)
    _held(filling, 2, 20, 21, 22, 23)

    assert _tags(filling.take(now=0.0)) == [10, 20, 11, 21]
    assert _tags(filling.take(now=0.0)) == [22, 12, 23, 13]
    # Shard 2 is empty: shard 1 alone fills the batch.
    assert _tags(filling.take(now=0.0)) == [14, 15, 16, 17]


def test_jobs_in_the_base_queue_take_their_turn_with_the_bulk_shards() -> None:
    filling = _filling()
    _held(filling, 3, 30, 31, 32, 33)
    _held(filling, 1, 10, 11, 12, 13, 14, 15)

    assert _tags(filling.take(now=0.0)) == [10, 30, 11, 31]
    assert _tags(filling.take(now=0.0)) == [32, 12, 33, 13]


# --- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _channel(settings: Settings) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(settings.queue.url))
    try:
        yield connection.channel()
    finally:
        connection.close()


def _depths(settings: Settings) -> dict[str, int]:
    """Ready messages of each job queue by its label (`interactive`, `bulk.2`, `base`)."""
    return {q.label: queue_depth(settings.queue, q.name) for q in job_queues(settings.queue)}


def _only(label: str, count: int, settings: Settings) -> dict[str, int]:
    return {q.label: count if q.label == label else 0 for q in job_queues(settings.queue)}


def _rows(settings: Settings, ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[str, int, str]]:
    with psycopg.connect(settings.postgres_url) as conn:
        rows = conn.execute(
            "SELECT id, lane, shard, status FROM images WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


def _owner_in_shard(shard: int, shards: int, not_this: str = "") -> str:
    return next(
        owner
        for owner in (f"owner-{n}" for n in range(1000))
        if bulk_shard(owner, shards) == shard and owner != not_this
    )


@pytest.fixture
def lanes(private_queue: Settings) -> Iterator[Settings]:
    """A private set of job queues, declared."""
    with _channel(private_queue) as channel:
        declare_topology(channel, private_queue.queue)
    yield private_queue


# --- intake -------------------------------------------------------------------------------------


def _accept(settings: Settings, owner: str, parts: int | None) -> list[uuid.UUID]:
    """Accept one request of `parts` images (None: the single-image route)."""
    db = Database(settings.postgres_url, max_size=2)
    publisher = JobPublisher(settings.queue)
    intake = ImageIntake(db, ObjectStore(settings.storage), publisher, lanes=settings.queue)
    try:
        with intake.begin(owner) as batch:
            for seed in range(parts or 1):
                batch.stage(validate_image("p.jpg", jpeg(32, 24, seed=seed)))
            bulk = [BulkPart("p.jpg", None) for _ in range(parts)] if parts else None
            answer = batch.commit("req", bulk)
    finally:
        publisher.close()
        db.close()
    items = answer.body["items"] if parts else [answer.body]
    return [uuid.UUID(item["id"]) for item in items]


def test_the_single_route_is_interactive_and_stored_on_the_row(lanes: Settings) -> None:
    [image_id] = _accept(lanes, "alice", None)

    assert _rows(lanes, [image_id]) == {image_id: (INTERACTIVE, 0, "pending")}
    assert _depths(lanes) == _only(INTERACTIVE, 1, lanes)


def test_a_bulk_request_up_to_the_threshold_is_interactive(lanes: Settings) -> None:
    threshold = lanes.queue.interactive_max_parts
    ids = _accept(lanes, "alice", threshold)

    assert {row[:2] for row in _rows(lanes, ids).values()} == {(INTERACTIVE, 0)}
    assert _depths(lanes) == _only(INTERACTIVE, threshold, lanes)


def test_a_bulk_request_over_the_threshold_goes_to_its_owners_shard(lanes: Settings) -> None:
    owner = _owner_in_shard(2, lanes.queue.bulk_shards)
    count = lanes.queue.interactive_max_parts + 1
    ids = _accept(lanes, owner, count)

    assert {row[:2] for row in _rows(lanes, ids).values()} == {(BULK, 2)}
    assert _depths(lanes) == _only("bulk.2", count, lanes)


def test_with_lanes_off_every_job_goes_to_the_base_queue_and_the_row_keeps_its_lane(
    lanes: Settings,
) -> None:
    off = dataclasses.replace(lanes, queue=dataclasses.replace(lanes.queue, lanes=False))
    [single] = _accept(off, "alice", None)
    bulk = _accept(off, _owner_in_shard(1, off.queue.bulk_shards), 6)

    rows = _rows(off, [single, *bulk])
    assert rows[single][:2] == (INTERACTIVE, 0)
    assert {rows[i][:2] for i in bulk} == {(BULK, 1)}
    assert _depths(off) == _only("base", 7, off)


# --- publishing again ---------------------------------------------------------------------------


def _insert(settings: Settings, lane: str, shard: int, count: int = 1) -> list[uuid.UUID]:
    news = [
        NewImage(
            i,
            "lanes-test",
            "a.jpg",
            "image/jpeg",
            10,
            "x",
            4,
            4,
            f"originals/{i}",
            lane=lane,
            shard=shard,
        )
        for i in (uuid.uuid4() for _ in range(count))
    ]
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        images.insert_images(conn, news)
    return [n.id for n in news]


def test_the_outbox_sweeper_republishes_each_job_to_its_rows_lane_and_shard(
    lanes: Settings,
) -> None:
    interactive = _insert(lanes, INTERACTIVE, 0)
    bulk = _insert(lanes, BULK, 3, count=2)
    db = Database(lanes.postgres_url, max_size=2)
    publisher = JobPublisher(lanes.queue)
    try:
        # At least ours: the schema is the session's, other tests may leave stranded rows too.
        assert OutboxSweeper(db, publisher, grace_seconds=0).sweep_once() >= 3
    finally:
        publisher.close()
        db.close()

    queued = _queued_ids(lanes)
    assert queued[INTERACTIVE] >= set(interactive)
    assert queued["bulk.3"] >= set(bulk)
    assert not (queued["base"] | queued["bulk.0"]) & {*interactive, *bulk}


def _queued_ids(settings: Settings) -> dict[str, set[uuid.UUID]]:
    """The image ids of the messages in each job queue, taken off the queues."""
    taken: dict[str, set[uuid.UUID]] = {}
    with _channel(settings) as channel:
        for queue in job_queues(settings.queue):
            ids = taken.setdefault(queue.label, set())
            while True:
                method, _, body = channel.basic_get(queue.name, auto_ack=True)
                if method is None:
                    break
                ids.add(JobMessage.decode(body).image_id)
    return taken


def test_dlq_requeue_sends_a_job_to_its_rows_lane_wherever_it_died(lanes: Settings) -> None:
    [image_id] = _insert(lanes, INTERACTIVE, 0)
    wrong = route(lanes.queue, JobMessage(image_id, lane=BULK, shard=1))
    with _channel(lanes) as channel:
        channel.confirm_delivery()
        channel.basic_publish("", wrong, JobMessage(image_id).encode())
        method, _, _ = channel.basic_get(wrong)
        channel.basic_nack(method.delivery_tag, requeue=False)
    dlq = lanes.queue.dead_letter_queue
    wait_for(lambda: queue_depth(lanes.queue, dlq) == 1, timeout=10)

    result = requeue_dead_letters(lanes, Selection(None))

    assert result.messages == 1
    assert _depths(lanes) == _only(INTERACTIVE, 1, lanes)
    assert queue_depth(lanes.queue, dlq) == 0


# --- ops status ---------------------------------------------------------------------------------


def test_ops_status_shows_the_depth_of_every_lane_and_shard(lanes: Settings) -> None:
    jobs = [JobMessage(uuid.uuid4(), "t", INTERACTIVE)] + [
        JobMessage(uuid.uuid4(), "t", BULK, 1) for _ in range(3)
    ]
    publisher = JobPublisher(lanes.queue)
    publisher.publish(jobs)
    publisher.close()

    report = collect_status(lanes).to_json()

    queues = report["queues"]
    assert queues["interactive"]["messages"] == 1
    assert queues["bulk.1"]["messages"] == 3
    assert {queues[f"bulk.{n}"]["messages"] for n in (0, 2, 3)} == {0}
    assert queues["base"]["messages"] == 0
    assert queues["dead_letter"]["messages"] == 0
    assert queues["bulk.1"]["name"] == f"{lanes.queue.queue}.bulk.1"


def test_the_autoscaler_counts_the_backlog_of_every_lane_and_shard(lanes: Settings) -> None:
    jobs = [JobMessage(uuid.uuid4(), "t", INTERACTIVE) for _ in range(2)]
    jobs += [JobMessage(uuid.uuid4(), "t", BULK, shard) for shard in (0, 3, 3)]
    publisher = JobPublisher(lanes.queue)
    publisher.publish(jobs)
    publisher.close()
    with _channel(lanes) as channel:
        channel.basic_publish("", lanes.queue.queue, JobMessage(uuid.uuid4()).encode())
    wait_for(lambda: queue_depth(lanes.queue, lanes.queue.queue) == 1, timeout=10)
    client = redis.Redis.from_url(lanes.redis_url)
    try:
        sample = Autoscaler(lanes, Bounds(1, 4, 50.0)).sample(client)
    finally:
        client.close()

    assert sample.depth == 6


# --- a worker node ------------------------------------------------------------------------------


def _backlog(settings: Settings, owner: str, count: int, lane: str = BULK) -> list[uuid.UUID]:
    """`count` pending images of `owner` sharing one small original, queued in `lane`."""
    key = f"originals/lanes-{uuid.uuid4()}"
    ObjectStore(settings.storage).put_original(key, jpeg(64, 48), "image/jpeg")
    shard = bulk_shard(owner, settings.queue.bulk_shards) if lane == BULK else 0
    news = [
        NewImage(i, owner, "a.jpg", "image/jpeg", 10, "x", 64, 48, key, lane=lane, shard=shard)
        for i in (uuid.uuid4() for _ in range(count))
    ]
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        images.insert_images(conn, news)
    publisher = JobPublisher(settings.queue)
    publisher.publish([JobMessage(n.id, "t", n.lane, n.shard) for n in news])
    publisher.close()
    return [n.id for n in news]


def _count(settings: Settings, ids: list[uuid.UUID], status: str) -> int:
    return sum(1 for row in _rows(settings, ids).values() if row[2] == status)


@contextlib.contextmanager
def _node(env: dict[str, str], settings: Settings, log: Path) -> Iterator[None]:
    node_env = {
        **env,
        "RABBITMQ_QUEUE": settings.queue.queue,
        "RABBITMQ_DEAD_LETTER_QUEUE": settings.queue.dead_letter_queue,
        "REDIS_PREFIX": settings.redis_prefix,
        "WORKER_PROCESSES": "1",
        "WORKER_PREFETCH": "8",
        "WORKER_BATCH_SIZE": str(BATCH_SIZE),
        "WORKER_TEST_HOLD_BATCH_SECONDS": str(HOLD_SECONDS),
    }
    node = start_worker(node_env, log)
    try:
        wait_for(lambda: log.exists() and b"consuming from" in log.read_bytes(), timeout=60)
        yield
    finally:
        stop_worker(node)


@pytest.mark.slow
def test_a_node_starts_an_interactive_upload_before_the_rest_of_a_deep_bulk_backlog(
    env: dict[str, str], lanes: Settings, tmp_path: Path
) -> None:
    backlog = _backlog(lanes, "bulk-owner", 300)
    with _node(env, lanes, tmp_path / "worker.log"):
        wait_for(lambda: _count(lanes, backlog, "completed") >= BATCH_SIZE, timeout=60)
        [interactive] = _backlog(lanes, "someone-else", 1, lane=INTERACTIVE)
        done_before = _count(lanes, backlog, "completed")

        wait_for(lambda: _count(lanes, [interactive], "completed") == 1, timeout=60)

        # Within the bulk batches already running when it arrived (two at most), not after
        # the hundreds still queued.
        assert _count(lanes, backlog, "completed") - done_before <= 2 * BATCH_SIZE
        assert _count(lanes, backlog, "pending") >= 250


@pytest.mark.slow
def test_a_second_bulk_owner_is_served_alongside_the_first_owners_backlog(
    env: dict[str, str], lanes: Settings, tmp_path: Path
) -> None:
    shards = lanes.queue.bulk_shards
    first = _backlog(lanes, _owner_in_shard(0, shards), 200)
    second = _backlog(lanes, _owner_in_shard(1, shards), 12)
    with _node(env, lanes, tmp_path / "worker.log"):
        wait_for(lambda: _count(lanes, second, "completed") == len(second), timeout=120)

        # Served in turn: about as many of the first owner's images as of the second's.
        assert _count(lanes, first, "completed") <= 2 * len(second) + 2 * BATCH_SIZE
        assert _count(lanes, first, "pending") >= 150


@pytest.mark.slow
def test_jobs_left_in_the_queue_from_before_lanes_complete_after_the_upgrade(
    env: dict[str, str], lanes: Settings, tmp_path: Path
) -> None:
    ids = _backlog(lanes, "old-owner", 5)
    # Move them to the base queue, in the message format from before lanes.
    with _channel(lanes) as channel:
        for queue in job_queues(lanes.queue):
            channel.queue_purge(queue.name)
        channel.confirm_delivery()
        for image_id in ids:
            body = json.dumps({"image_id": str(image_id), "request_id": "old"}).encode()
            channel.basic_publish("", lanes.queue.queue, body)
    assert _depths(lanes) == _only("base", 5, lanes)

    with _node(env, lanes, tmp_path / "worker.log"):
        wait_for(lambda: _count(lanes, ids, "completed") == 5, timeout=120)
        assert queue_depth(lanes.queue) == 0
