"""Operator commands: the autoscaling rule, `ops scale`, `ops autoscale`, `ops status` and
`ops dlq`, run in-process against the real PostgreSQL, Redis and RabbitMQ.

Each test gets its own queue pair and Redis prefix, and this module its own schema, so depths
and counts are exact."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pika
import psycopg
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from common.broker import declare_topology, delete_topology, queue_depth, route
from common.cache import image_cache_key
from common.config import Settings
from common.jobs import JobMessage
from common.node_control import Heartbeat, desired_processes_key, heartbeat_key
from db.images import fail_unfinished
from db.migrate import apply_migrations
from db.schemas import throwaway_schema, with_search_path
from engine.control import NodeControl, NodeCounters
from ops.dlq import (
    Selection,
    dlq_command,
    fail_dead_letters,
    list_dead_letters,
    requeue_dead_letters,
)
from ops.scale import Autoscaler, Bounds, decide, history_key, scale_command
from ops.status import status_command
from tests.support import BASE_POSTGRES_URL, wait_for

# --- decide: the autoscaling rule ---------------------------------------------------------------

TARGET = 50.0


def test_decide_scales_up_only_after_two_samples_over_target() -> None:
    assert decide(2, 250, [], 1, 8, TARGET) == 2
    assert decide(2, 250, [40], 1, 8, TARGET) == 2
    assert decide(2, 250, [250], 1, 8, TARGET) == 3


def test_decide_scales_down_only_after_three_low_samples() -> None:
    assert decide(4, 0, [0], 1, 8, TARGET) == 4
    assert decide(4, 0, [100, 0], 1, 8, TARGET) == 4
    assert decide(4, 0, [0, 0], 1, 8, TARGET) == 3
    assert decide(4, 40, [30, 10], 1, 8, TARGET) == 3


def test_decide_holds_between_the_low_water_mark_and_the_target() -> None:
    # 100 messages over 4 processes is 25 per process: below 50, above 12.5.
    assert decide(4, 100, [100, 100, 100], 1, 8, TARGET) == 4


def test_decide_moves_one_step_and_never_past_the_bounds() -> None:
    assert decide(8, 10_000, [10_000, 10_000], 1, 8, TARGET) == 8
    assert decide(1, 0, [0, 0, 0], 1, 8, TARGET) == 1
    assert decide(3, 10_000, [10_000], 1, 8, TARGET) == 4


def test_decide_brings_a_count_outside_the_bounds_back_at_once() -> None:
    assert decide(12, 10_000, [10_000], 2, 8, TARGET) == 8
    assert decide(1, 0, [], 2, 8, TARGET) == 2


@given(
    current=st.integers(1, 20),
    depth=st.floats(0, 1e6),
    history=st.lists(st.floats(0, 1e6), max_size=4),
    bounds=st.tuples(st.integers(1, 20), st.integers(1, 20)).map(sorted),
)
def test_decide_always_answers_inside_the_bounds_one_step_at_most(
    current: int, depth: float, history: list[float], bounds: list[int]
) -> None:
    low, high = bounds
    desired = decide(current, depth, history, low, high, TARGET)

    assert low <= desired <= high
    if low <= current <= high:
        assert abs(desired - current) <= 1


# --- fixtures: own schema, own queues, own Redis prefix -----------------------------------------


@pytest.fixture(scope="module")
def ops_schema(run_id: str) -> Iterator[str]:
    with throwaway_schema(BASE_POSTGRES_URL, f"pm_ops_{run_id}") as name:
        yield name


@pytest.fixture
def ops_settings(env: dict[str, str], ops_schema: str) -> Iterator[Settings]:
    """The session's environment with this module's schema and this test's queues and prefix."""
    tag = uuid.uuid4().hex[:8]
    settings = Settings.from_env(
        {
            **env,
            "POSTGRES_URL": with_search_path(BASE_POSTGRES_URL, ops_schema),
            "RABBITMQ_QUEUE": f"pm-ops-{tag}",
            "REDIS_PREFIX": f"pmops:{tag}:",
        }
    )
    apply_migrations(settings.postgres_url)
    with _channel(settings) as channel:
        declare_topology(channel, settings.queue)
    yield settings
    delete_topology(settings.queue)
    client = _redis(settings)
    keys = list(client.scan_iter(f"{settings.redis_prefix}*"))
    if keys:
        client.delete(*keys)
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        conn.execute("DELETE FROM images")


class _channel:
    """A channel on its own connection, closed with it."""

    def __init__(self, settings: Settings) -> None:
        self._connection = pika.BlockingConnection(pika.URLParameters(settings.queue.url))

    def __enter__(self) -> Any:
        return self._connection.channel()

    def __exit__(self, *exc: object) -> None:
        self._connection.close()


def _redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, decode_responses=True)


def _depth(settings: Settings, queue: str) -> int:
    return queue_depth(settings.queue, queue)


def _publish_jobs(settings: Settings, bodies: list[bytes]) -> None:
    with _channel(settings) as channel:
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish("", settings.queue.queue, body)


def _dead_letter(settings: Settings, image_ids: list[uuid.UUID]) -> None:
    """Really dead-letter one job per image: publish, take, reject without requeue."""
    _publish_jobs(settings, [JobMessage(i).encode() for i in image_ids])
    with _channel(settings) as channel:
        for _ in image_ids:
            method, _, _ = channel.basic_get(settings.queue.queue)
            channel.basic_nack(method.delivery_tag, requeue=False)
    dlq = settings.queue.dead_letter_queue
    wait_for(lambda: _depth(settings, dlq) == len(image_ids), timeout=10)


def _insert_image(
    settings: Settings, status: str, error: str | None = None, age_seconds: int = 0
) -> uuid.UUID:
    image_id = uuid.uuid4()
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO images (id, owner, filename, content_type, size_bytes, sha256,
                   source_width, source_height, status, error, original_key, result_key,
                   enqueued_at, updated_at)
               VALUES (%s, 'ops-test', 'a.png', 'image/png', 10, 'x', 4, 4, %s, %s, %s, %s,
                       now(), now() - make_interval(secs => %s))""",
            (
                image_id,
                status,
                error,
                f"originals/{image_id}",
                f"results/{image_id}.png" if status == "completed" else None,
                age_seconds,
            ),
        )
    return image_id


def _row(settings: Settings, image_id: uuid.UUID) -> tuple[str, str | None, Any]:
    with psycopg.connect(settings.postgres_url) as conn:
        row = conn.execute(
            "SELECT status, error, enqueued_at FROM images WHERE id = %s", (image_id,)
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def _heartbeat(settings: Settings, host: str, pid: int, processes: int) -> None:
    """A node's heartbeat hash exactly as the engine writes it."""
    client = _redis(settings)
    key = heartbeat_key(settings.redis_prefix, host, pid)
    now = time.time()
    beat = Heartbeat(processes, 120, 3, 9, now - 60, now, settings.queue.queue)
    client.hset(key, mapping=beat.to_hash())
    client.expire(key, 10)


# --- scale and autoscale ------------------------------------------------------------------------


def test_scale_sets_the_desired_processes_and_names_the_live_nodes(
    ops_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    _heartbeat(ops_settings, "node-a", 4242, processes=2)

    assert scale_command(["--processes", "5"], ops_settings) == 0

    assert _redis(ops_settings).get(desired_processes_key(ops_settings.redis_prefix)) == "5"
    out = capsys.readouterr().out
    assert f"{ops_settings.redis_prefix}engine:processes = 5" in out
    assert "node-a:4242  processes 2 -> 5" in out


def test_scale_refuses_zero_and_leaves_the_key_alone(ops_settings: Settings) -> None:
    with pytest.raises(SystemExit) as refused:
        scale_command(["--processes", "0"], ops_settings)

    assert refused.value.code == 2
    assert _redis(ops_settings).get(desired_processes_key(ops_settings.redis_prefix)) is None


def test_autoscale_adds_a_process_after_two_deep_samples_and_removes_it_when_idle(
    ops_settings: Settings,
) -> None:
    _heartbeat(ops_settings, "node-a", 1, processes=2)
    _publish_jobs(ops_settings, [JobMessage(uuid.uuid4()).encode() for _ in range(300)])
    scaler = Autoscaler(ops_settings, Bounds(minimum=1, maximum=4, target_per_process=50))
    key = desired_processes_key(ops_settings.redis_prefix)

    assert scaler.step() == 2
    assert _redis(ops_settings).get(key) is None
    assert scaler.step() == 3
    assert _redis(ops_settings).get(key) == "3"
    assert _redis(ops_settings).get(history_key(ops_settings.redis_prefix)) is None

    with _channel(ops_settings) as channel:
        channel.queue_purge(ops_settings.queue.queue)
    assert [scaler.step() for _ in range(3)] == [3, 3, 2]
    assert _redis(ops_settings).get(key) == "2"


# --- the Redis contract between worker nodes and these commands --------------------------------


def _node_control(settings: Settings, processes: int, resized: list[int]) -> NodeControl:
    """The engine's own control loop for a node running `processes`, recording its resizes."""
    counters = NodeCounters(processes=processes, completed=7, failed=1, batches=2)
    return NodeControl(
        redis.Redis.from_url(settings.redis_url),
        settings.redis_prefix,
        settings.queue,
        lambda: counters,
        resized.append,
        max_processes=64,
    )


def test_status_shows_the_node_whose_heartbeat_the_engine_wrote_until_it_stops(
    ops_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    def listed_nodes() -> list[dict[str, Any]]:
        status_command(["--json"], ops_settings)
        return list(json.loads(capsys.readouterr().out)["nodes"])

    control = _node_control(ops_settings, processes=3, resized=[])
    control.start()
    try:
        [node] = wait_for(listed_nodes, timeout=10)
    finally:
        control.stop()

    assert (node["host"], node["pid"], node["queue"]) == (
        socket.gethostname(),
        os.getpid(),
        ops_settings.queue.queue,
    )
    assert (node["processes"], node["completed"], node["failed"], node["batches"]) == (3, 7, 1, 2)
    assert listed_nodes() == []


def test_a_node_resizes_to_the_count_ops_scale_sets_and_only_when_it_differs(
    ops_settings: Settings,
) -> None:
    resized: list[int] = []
    control = _node_control(ops_settings, processes=2, resized=resized)

    assert scale_command(["--processes", "2"], ops_settings) == 0
    control.tick(1)
    assert resized == []

    assert scale_command(["--processes", "1"], ops_settings) == 0
    control.tick(1)
    assert resized == [1]


# --- status -------------------------------------------------------------------------------------


def test_status_json_reports_queues_nodes_throughput_failures_and_images(
    ops_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    _publish_jobs(ops_settings, [JobMessage(uuid.uuid4()).encode() for _ in range(3)])
    written = time.time()
    _heartbeat(ops_settings, "node-b", 777, processes=3)
    _redis(ops_settings).set(desired_processes_key(ops_settings.redis_prefix), "3")
    for _ in range(2):
        _insert_image(ops_settings, "completed")
    _insert_image(ops_settings, "failed", "decode error")
    _insert_image(ops_settings, "failed", "decode error", age_seconds=600)
    _insert_image(ops_settings, "failed", "too many pixels", age_seconds=7200)
    _insert_image(ops_settings, "pending")

    assert status_command(["--json"], ops_settings) == 0
    # The heartbeat was written after `written` and read before now: its age is within that.
    longest_age = time.time() - written
    report = json.loads(capsys.readouterr().out)

    jobs, dead = report["queues"]["jobs"], report["queues"]["dead_letter"]
    assert (jobs["name"], jobs["messages"], jobs["consumers"]) == (ops_settings.queue.queue, 3, 0)
    assert (dead["messages"], dead["exists"]) == (0, True)
    [node] = report["nodes"]
    assert (node["host"], node["pid"], node["processes"], node["completed"]) == (
        "node-b",
        777,
        3,
        120,
    )
    assert 0 <= node["heartbeat_age_seconds"] <= round(longest_age, 1)
    assert report["desired_processes"] == 3
    assert report["throughput"]["completed"] == 2
    assert report["throughput"]["failed"] == 1
    assert report["failures"] == [{"reason": "decode error", "count": 2}]
    assert report["images"] == {
        "pending": 1,
        "processing": 0,
        "completed": 2,
        "failed": 3,
        "cancelled": 0,
    }
    assert report["errors"] == {}


def test_status_names_an_unreachable_broker_and_still_reports_the_rest(
    ops_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = replace(ops_settings.queue, url="amqp://guest:guest@127.0.0.1:1/%2F")
    broken = replace(ops_settings, queue=closed)

    assert status_command([], broken) == 1

    out = capsys.readouterr().out
    assert "UNAVAILABLE rabbitmq" in out
    assert "images  pending 0" in out


# --- dlq ----------------------------------------------------------------------------------------


def test_dlq_list_shows_reason_and_image_status_and_leaves_the_messages(
    ops_settings: Settings,
) -> None:
    stuck = _insert_image(ops_settings, "processing")
    _dead_letter(ops_settings, [stuck])
    with _channel(ops_settings) as channel:
        channel.basic_publish("", ops_settings.queue.dead_letter_queue, b"not json")
    dlq = ops_settings.queue.dead_letter_queue

    listed = list_dead_letters(ops_settings, limit=10)

    by_id = {item.image_id: item for item in listed}
    assert set(by_id) == {str(stuck), None}
    assert by_id[str(stuck)].reason == "rejected"
    assert by_id[str(stuck)].deaths == 1
    assert by_id[str(stuck)].from_queue == ops_settings.queue.queue
    assert by_id[str(stuck)].image_status == "processing"
    assert by_id[None].body.startswith("(malformed)")
    wait_for(lambda: _depth(ops_settings, dlq) == 2, timeout=10)


def test_dlq_requeue_moves_chosen_messages_back_and_resets_their_images(
    ops_settings: Settings,
) -> None:
    processing = _insert_image(ops_settings, "processing")
    failed = _insert_image(ops_settings, "failed", "worker crashed")
    other = _insert_image(ops_settings, "processing")
    _dead_letter(ops_settings, [processing, failed, other])
    cache = _redis(ops_settings)
    cache.set(image_cache_key(ops_settings.redis_prefix, failed), '{"status": "failed"}')

    result = requeue_dead_letters(ops_settings, Selection(frozenset({processing, failed})))

    assert result.messages == 2 and result.missing == []
    assert sorted(result.images_changed, key=str) == sorted([processing, failed], key=str)
    # Back to the lane stored with the images (these rows have the default: bulk, shard 0).
    lane_queue = route(ops_settings.queue, JobMessage(processing))
    assert _depth(ops_settings, lane_queue) == 2
    wait_for(lambda: _depth(ops_settings, ops_settings.queue.dead_letter_queue) == 1, timeout=10)
    for image_id in (processing, failed):
        status, error, enqueued_at = _row(ops_settings, image_id)
        assert (status, error) == ("pending", None) and enqueued_at is not None
    assert _row(ops_settings, other)[0] == "processing"
    assert cache.get(image_cache_key(ops_settings.redis_prefix, failed)) is None
    with _channel(ops_settings) as channel:
        bodies = set()
        for _ in range(2):
            _, _, body = channel.basic_get(lane_queue, auto_ack=True)
            bodies.add(JobMessage.decode(body).image_id)
    assert bodies == {processing, failed}


def test_dlq_requeue_of_an_image_that_ran_out_of_attempts_gives_it_a_fresh_count(
    ops_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Requeueing is what an operator does once the dependency that used up the attempts is
    back: with the old count the next claim would fail the image again without rendering it."""
    limit = ops_settings.queue.delivery_limit
    spent = _insert_image(
        ops_settings, "failed", f"gave up after {limit} attempts: a dependency kept failing"
    )
    with psycopg.connect(ops_settings.postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE images SET attempts = %s WHERE id = %s", (limit, spent))
    _dead_letter(ops_settings, [spent])

    assert dlq_command(["requeue", str(spent)], ops_settings) == 0

    assert "requeued 1 messages; 1 images reset to pending" in capsys.readouterr().out
    with psycopg.connect(ops_settings.postgres_url) as conn:
        row = conn.execute(
            "SELECT status, error, attempts FROM images WHERE id = %s", (spent,)
        ).fetchone()
    assert row == ("pending", None, 0)


def test_dlq_requeue_all_keeps_malformed_messages_and_completed_images(
    ops_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    done = _insert_image(ops_settings, "completed")
    _dead_letter(ops_settings, [done])
    with _channel(ops_settings) as channel:
        channel.basic_publish("", ops_settings.queue.dead_letter_queue, b"garbage")

    assert dlq_command(["requeue", "--all"], ops_settings) == 0

    assert "requeued 1 messages; 0 images reset" in capsys.readouterr().out
    assert _row(ops_settings, done)[0] == "completed"
    assert queue_depth(ops_settings.queue) == 1
    wait_for(lambda: _depth(ops_settings, ops_settings.queue.dead_letter_queue) == 1, timeout=10)


def test_dlq_fail_marks_images_failed_with_the_reason_and_removes_the_messages(
    ops_settings: Settings,
) -> None:
    stuck = _insert_image(ops_settings, "processing")
    done = _insert_image(ops_settings, "completed")
    _dead_letter(ops_settings, [stuck, done])

    result = fail_dead_letters(ops_settings, Selection(None))

    assert result.messages == 2 and result.images_changed == [stuck]
    assert _row(ops_settings, stuck)[:2] == ("failed", "dead-lettered: rejected")
    assert _row(ops_settings, done)[0] == "completed"
    assert _depth(ops_settings, ops_settings.queue.dead_letter_queue) == 0
    assert queue_depth(ops_settings.queue) == 0


def test_dlq_with_an_id_not_in_the_queue_exits_1_and_touches_nothing(
    ops_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    stuck = _insert_image(ops_settings, "processing")
    _dead_letter(ops_settings, [stuck])
    absent = uuid.uuid4()

    assert dlq_command(["fail", str(absent)], ops_settings) == 1

    assert f"not in the dead-letter queue: {absent}" in capsys.readouterr().err
    assert _row(ops_settings, stuck)[0] == "processing"
    wait_for(lambda: _depth(ops_settings, ops_settings.queue.dead_letter_queue) == 1, timeout=10)


def test_failing_unfinished_images_records_each_its_own_error_and_skips_finished_ones(
    ops_settings: Settings,
) -> None:
    pending = _insert_image(ops_settings, "pending")
    processing = _insert_image(ops_settings, "processing")
    done = _insert_image(ops_settings, "completed")
    failed = _insert_image(ops_settings, "failed", "decode error")

    with psycopg.connect(ops_settings.postgres_url, autocommit=True) as conn:
        changed = fail_unfinished(
            conn,
            [(pending, "first"), (processing, "second"), (done, "third"), (failed, "fourth")],
        )

    assert sorted(changed, key=str) == sorted([pending, processing], key=str)
    assert _row(ops_settings, pending)[:2] == ("failed", "first")
    assert _row(ops_settings, processing)[:2] == ("failed", "second")
    assert _row(ops_settings, done)[:2] == ("completed", None)
    assert _row(ops_settings, failed)[:2] == ("failed", "decode error")
