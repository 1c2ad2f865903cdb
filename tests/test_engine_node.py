"""A worker node under faults: a CPU process killed, the node stopped or killed, bad messages.

Each test runs its own node on its own queue, so faults do not reach other tests' work."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from common.broker import declare_topology, delete_topology, queue_depth
from common.config import Settings
from common.jobs import JobMessage
from engine.slots import SHM_DIR
from tests.faults import FailingS3Proxy
from tests.support import (
    ApiClient,
    StackProbe,
    free_port,
    jpeg,
    multipart,
    start_worker,
    stop_worker,
    wait_for,
)

pytestmark = pytest.mark.slow


@dataclasses.dataclass
class IsolatedStack:
    """An API and worker nodes bound to a queue of their own."""

    env: dict[str, str]
    settings: Settings
    api: ApiClient
    logs: Path
    nodes: list[subprocess.Popen[bytes]] = dataclasses.field(default_factory=list)

    def start_node(self, *args: str) -> subprocess.Popen[bytes]:
        node = start_worker(self.env, self.logs, *args)
        self.nodes.append(node)
        return node

    def upload_many(self, count: int, width: int = 1600, height: int = 1200) -> list[str]:
        ids = []
        for i in range(count):
            response = self.api.upload(jpeg(width, height, seed=i), f"img-{i}.jpg")
            assert response.status_code == 201, response.text
            ids.append(response.json["id"])
        return ids

    def queue_depth(self, queue: str | None = None) -> int:
        return queue_depth(self.settings.queue, queue)

    def publish_raw(self, body: bytes) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.settings.queue.url))
        try:
            channel = connection.channel()
            declare_topology(channel, self.settings.queue)
            channel.basic_publish("", self.settings.queue.queue, body)
        finally:
            connection.close()


@pytest.fixture
def stack(request, env, settings, issuer, user_id, tmp_path) -> Iterator[IsolatedStack]:
    """`@pytest.mark.stack_env(NAME=value)` adds settings for this stack's API and nodes."""
    from ingest.app import Dependencies, create_app

    queue = f"{settings.queue.queue}-{uuid.uuid4().hex[:6]}"
    marker = request.node.get_closest_marker("stack_env")
    isolated_env = {
        **env,
        "RABBITMQ_QUEUE": queue,
        "REDIS_PREFIX": f"{settings.redis_prefix}{queue[-6:]}:",
        **(marker.kwargs if marker else {}),
    }
    isolated = Settings.from_env(isolated_env)
    deps = Dependencies.connect(isolated)
    api = ApiClient(create_app(isolated, deps), issuer.mint_token(user_id, ("user",)))
    stack = IsolatedStack(isolated_env, isolated, api, tmp_path / "worker.log")
    yield stack
    for node in stack.nodes:
        if node.poll() is None:
            stop_worker(node)
    deps.close()
    delete_topology(isolated.queue)


def assert_all_completed_once(probe: StackProbe, owner: str, ids: list[str]) -> None:
    rows = {str(r[0]): r for r in probe.rows_for(owner)}
    assert sorted(rows) == sorted(ids)
    assert {r[1] for r in rows.values()} == {"completed"}, [r for r in rows.values()]
    results = probe.results()
    for image_id in ids:
        assert [k for k in results if image_id in k] == [f"results/{image_id}.png"]


def descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            children = (task / "children").read_text().split()
            found.extend(int(c) for c in children)
            frontier.extend(int(c) for c in children)
    return found


def cpu_processes(node_pid: int) -> list[int]:
    """The pool's processes: children of the node's forkserver."""
    for pid in descendants(node_pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"forkserver" in cmdline:
            return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def node_segments(pid: int) -> list[str]:
    return [p.name for p in SHM_DIR.glob(f"pixelmill-{pid}-*")]


def test_killing_a_cpu_process_mid_run_loses_nothing(
    stack: IsolatedStack, probe: StackProbe, user_id: str
) -> None:
    ids = stack.upload_many(24)
    node = stack.start_node("--processes", "2", "--batch-size", "8")
    victims = wait_for(lambda: cpu_processes(node.pid), timeout=30)
    wait_for(lambda: any(probe.status(i) == "completed" for i in ids), timeout=60, interval=0.02)
    os.kill(victims[0], signal.SIGKILL)
    wait_for(lambda: all(probe.status(i) == "completed" for i in ids), timeout=120)
    assert node.poll() is None, "the node must survive the loss of a CPU process"
    assert_all_completed_once(probe, user_id, ids)
    assert stack.queue_depth() == 0


def test_sigterm_drains_in_flight_work_and_releases_shared_memory(
    stack: IsolatedStack, probe: StackProbe, user_id: str
) -> None:
    ids = stack.upload_many(16)
    node = stack.start_node("--processes", "2", "--batch-size", "4", "--prefetch", "8")
    wait_for(lambda: node_segments(node.pid), timeout=30)
    wait_for(lambda: any(probe.status(i) == "completed" for i in ids), timeout=60, interval=0.02)
    assert stop_worker(node, timeout=60) == 0
    assert node_segments(node.pid) == []
    # What the node had not started is still queued, never half-done.
    statuses = [probe.status(i) for i in ids]
    assert "processing" not in statuses
    assert stack.queue_depth() == statuses.count("pending")
    stack.start_node("--processes", "2")
    wait_for(lambda: all(probe.status(i) == "completed" for i in ids), timeout=120)
    assert_all_completed_once(probe, user_id, ids)


def test_sigkilled_node_is_replaced_without_loss_and_its_memory_swept(
    stack: IsolatedStack, probe: StackProbe, user_id: str
) -> None:
    ids = stack.upload_many(16)
    node = stack.start_node("--processes", "2", "--batch-size", "4")
    wait_for(lambda: node_segments(node.pid), timeout=30)
    wait_for(lambda: any(probe.status(i) == "completed" for i in ids), timeout=60, interval=0.02)
    cpu = cpu_processes(node.pid)
    assert cpu, "the node's CPU processes must be running before the kill"
    children = descendants(node.pid)
    node.kill()
    node.wait()
    # Its fork server and CPU processes must not outlive it.
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), timeout=10)
    leaked = node_segments(node.pid)
    stack.start_node("--processes", "2")
    wait_for(lambda: all(probe.status(i) == "completed" for i in ids), timeout=120)
    assert_all_completed_once(probe, user_id, ids)
    for name in leaked:
        assert not (SHM_DIR / name).exists()


def test_malformed_message_is_dead_lettered_not_retried(stack: IsolatedStack) -> None:
    stack.publish_raw(b"this is not json")
    stack.start_node("--processes", "1")
    wait_for(lambda: stack.queue_depth(stack.settings.queue.dead_letter_queue) == 1, timeout=30)
    assert stack.queue_depth() == 0


def test_redelivered_job_for_completed_image_is_acked_without_work(
    stack: IsolatedStack, probe: StackProbe
) -> None:
    [image_id] = stack.upload_many(1, 900, 600)
    stack.start_node("--processes", "1")
    wait_for(lambda: probe.status(image_id) == "completed", timeout=60)
    before = probe.updated_at(image_id)
    stack.publish_raw(JobMessage(uuid.UUID(image_id)).encode())
    time.sleep(0.5)
    wait_for(lambda: stack.queue_depth() == 0, timeout=30)
    assert probe.status(image_id) == "completed"
    assert probe.updated_at(image_id) == before


@pytest.mark.stack_env(RABBITMQ_DELIVERY_LIMIT="3")
def test_image_whose_storage_keeps_failing_ends_failed_with_a_reason(
    stack: IsolatedStack, probe: StackProbe
) -> None:
    [image_id] = stack.upload_many(1, 900, 600)
    # The node's store answers, but this image's original fails every time: the failure is the
    # image's own, so it counts against its deliveries (an unreachable store would pause the
    # node instead: tests/test_outages.py).
    proxy = FailingS3Proxy(stack.settings.storage.endpoint)
    proxy.failing = {image_id}
    stack.env["MINIO_ENDPOINT"] = proxy.endpoint
    try:
        stack.start_node("--processes", "1")
        wait_for(lambda: probe.status(image_id) == "failed", timeout=90)
    finally:
        proxy.close()
    error = stack.api.get(f"/api/v1/images/{image_id}").json["error"]
    assert "gave up after 3 attempts" in error
    assert b"unreachable: pausing" not in stack.logs.read_bytes(), "the store was taken for down"
    wait_for(lambda: stack.queue_depth() == 0, timeout=10)
    assert stack.queue_depth(stack.settings.queue.dead_letter_queue) == 0


def test_long_poll_waits_for_the_engine_and_returns_the_terminal_status(
    stack: IsolatedStack, probe: StackProbe
) -> None:
    import threading

    [image_id] = stack.upload_many(1, 900, 600)
    answers: list = []
    poll = threading.Thread(
        target=lambda: answers.append(stack.api.get(f"/api/v1/images/{image_id}", wait=30))
    )
    poll.start()
    poll.join(timeout=1.0)
    assert poll.is_alive(), "with no worker running the long poll must still be waiting"
    stack.start_node("--processes", "1")
    poll.join(timeout=60)
    assert answers and answers[0].status_code == 200
    assert answers[0].json["status"] == "completed"
    assert answers[0].json["download_url"]


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.split()[-1])
    return 0.0


def test_node_scales_its_cpu_processes_on_command_and_reports_metrics(
    stack: IsolatedStack, probe: StackProbe, user_id: str
) -> None:
    import redis

    from engine.control import desired_processes_key, heartbeat_key

    port = free_port()
    stack.env["METRICS_PORT"] = str(port)
    client = redis.Redis.from_url(stack.settings.redis_url, decode_responses=True)
    prefix = stack.settings.redis_prefix
    node = stack.start_node("--processes", "1")
    beat = heartbeat_key(prefix, __import__("socket").gethostname(), node.pid)
    wait_for(lambda: client.hget(beat, "processes") == "1", timeout=30)
    try:
        client.set(desired_processes_key(prefix), "2")
        wait_for(lambda: client.hget(beat, "processes") == "2", timeout=30)
        wait_for(lambda: len(cpu_processes(node.pid)) == 2, timeout=30)
        ids = stack.upload_many(8, 900, 600)
        client.set(desired_processes_key(prefix), "1")
        wait_for(lambda: all(probe.status(i) == "completed" for i in ids), timeout=90)
        wait_for(lambda: client.hget(beat, "processes") == "1", timeout=30)
    finally:
        client.delete(desired_processes_key(prefix))
    assert_all_completed_once(probe, user_id, ids)
    text = scrape(port)
    assert metric_value(text, "pixelmill_engine_images_total", outcome="completed") == 8
    assert metric_value(text, "pixelmill_engine_stage_seconds_count", stage="render") == 8
    assert metric_value(text, "pixelmill_engine_processes") == 1
    assert int(client.hget(beat, "completed") or 0) == 8


def test_existing_queue_with_other_arguments_is_used_as_it_is(
    stack: IsolatedStack, probe: StackProbe, user_id: str
) -> None:
    """Queue arguments cannot change after creation: a deployment whose queue was made with
    another delivery limit must keep working rather than refuse every publish."""
    from common.broker import dead_letter_queue_arguments, job_queue_arguments

    older = dataclasses.replace(stack.settings.queue, delivery_limit=3)
    assert job_queue_arguments(older) != job_queue_arguments(stack.settings.queue)
    connection = pika.BlockingConnection(pika.URLParameters(older.url))
    channel = connection.channel()
    channel.queue_delete(older.queue)
    channel.queue_declare(
        older.dead_letter_queue, durable=True, arguments=dead_letter_queue_arguments()
    )
    channel.queue_declare(older.queue, durable=True, arguments=job_queue_arguments(older))
    connection.close()

    [image_id] = stack.upload_many(1, 900, 600)  # the API's publish was confirmed: 201
    stack.start_node("--processes", "1")
    wait_for(lambda: probe.status(image_id) == "completed", timeout=60)
    assert_all_completed_once(probe, user_id, [image_id])
    wait_for(lambda: stack.queue_depth() == 0, timeout=10)
    assert stack.queue_depth(stack.settings.queue.dead_letter_queue) == 0
    assert "PRECONDITION_FAILED" not in stack.logs.read_text()
    # The queue is still the one made with the older limit, not deleted and declared anew: a
    # declaration must match an existing queue's arguments exactly, or the broker refuses it.
    connection = pika.BlockingConnection(pika.URLParameters(older.url))
    try:
        connection.channel().queue_declare(
            older.queue, durable=True, arguments=job_queue_arguments(older)
        )
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            connection.channel().queue_declare(
                older.queue, durable=True, arguments=job_queue_arguments(stack.settings.queue)
            )
        assert refused.value.reply_code == 406
    finally:
        if connection.is_open:
            connection.close()


@pytest.mark.stack_env(LOG_FORMAT="json")
def test_request_id_travels_from_the_upload_to_the_worker_log(stack: IsolatedStack, probe) -> None:
    import json

    response = stack.api.post_raw(
        "/api/v1/upload",
        *multipart([("image", "traced.jpg", jpeg(300, 200), "image/jpeg")]),
        **{"X-Request-ID": "trace-4711"},
    )
    assert response.headers["X-Request-ID"] == "trace-4711"
    image_id = response.json["id"]
    stack.start_node("--processes", "1")
    wait_for(lambda: probe.status(image_id) == "completed", timeout=60)

    def logged() -> list[dict]:
        events = []
        for line in stack.logs.read_text().splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return [e for e in events if e.get("image_id") == image_id]

    [event] = wait_for(logged, timeout=10)
    assert event["request_id"] == "trace-4711"
    assert event["status"] == "completed"


def test_outbox_sweeper_queues_an_upload_whose_publish_never_happened(
    stack: IsolatedStack, probe: StackProbe, user_id: str
) -> None:
    """The API died after committing the row and storing the original, before publishing."""
    from common.broker import JobPublisher
    from common.storage import ObjectStore, original_key
    from db import images
    from db.pool import Database
    from engine.outbox import OutboxSweeper

    data = jpeg(500, 400)
    image_id = uuid.uuid4()
    ObjectStore(stack.settings.storage).put_original(original_key(image_id), data, "image/jpeg")
    db = Database(stack.settings.postgres_url)
    try:
        with db.transaction() as conn:
            images.insert_images(
                conn,
                [
                    images.NewImage(
                        image_id,
                        user_id,
                        "stranded.jpg",
                        "image/jpeg",
                        len(data),
                        "0" * 64,
                        500,
                        400,
                        original_key(image_id),
                    )
                ],
            )
        sweeper = OutboxSweeper(db, JobPublisher(stack.settings.queue), grace_seconds=0)
        # At least this row (the database may hold other tests' stranded rows too).
        assert sweeper.sweep_once() >= 1
        with db.transaction() as conn:
            still_stranded = {r.id for r in images.find_unenqueued(conn, 0, 1_000_000)}
        assert image_id not in still_stranded, "a swept row is marked enqueued"
    finally:
        db.close()
    stack.start_node("--processes", "1")
    wait_for(lambda: probe.status(image_id) == "completed", timeout=60)
    assert_all_completed_once(probe, user_id, [str(image_id)])


# Three times the silence (about 2 s) after which the broker drops a connection with a 1 s
# heartbeat.
HOLD_BATCH_SECONDS = 6


@pytest.mark.stack_env(
    RABBITMQ_HEARTBEAT_SECONDS="1", WORKER_TEST_HOLD_BATCH_SECONDS=str(HOLD_BATCH_SECONDS)
)
def test_heartbeats_are_served_while_a_long_batch_runs(
    stack: IsolatedStack, probe: StackProbe, user_id: str
) -> None:
    """With a 1 s heartbeat the broker drops a connection silent for about 2 s. The node holds
    its batch for 6 s (a test hook), so only a consumer that keeps serving the connection while
    the batch runs keeps it; one that does not loses its acks and sees the batch redelivered."""
    import socket

    import redis

    from engine.control import heartbeat_key

    ids = stack.upload_many(4, 900, 600)
    node = stack.start_node("--processes", "1", "--batch-size", "4", "--batch-wait-ms", "3000")
    wait_for(lambda: all(probe.status(i) == "completed" for i in ids), timeout=120)
    client = redis.Redis.from_url(stack.settings.redis_url, decode_responses=True)
    beat = heartbeat_key(stack.settings.redis_prefix, socket.gethostname(), node.pid)
    wait_for(lambda: client.hget(beat, "completed") == "4", timeout=30)
    wait_for(lambda: stack.queue_depth() == 0, timeout=10)
    log = stack.logs.read_text()
    assert f"every batch is held for {HOLD_BATCH_SECONDS:.1f} s" in log, "the hook was not on"
    assert client.hget(beat, "batches") == "1", "the batch was delivered more than once"
    assert "lost RabbitMQ" not in log and "connection closed" not in log.lower()
    assert node.poll() is None
    assert_all_completed_once(probe, user_id, ids)
