"""A worker node under faults: a CPU process killed, the node stopped or killed, bad messages.

Each test runs its own node on its own queue, so faults do not reach other tests' work."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pytest

from common.batch_timing import BatchTiming
from common.broker import declare_topology
from common.config import QueueSettings, Settings
from common.jobs import JobMessage
from engine.slots import SHM_DIR
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
        connection = pika.BlockingConnection(pika.URLParameters(self.settings.queue.url))
        try:
            declared = connection.channel().queue_declare(
                queue or self.settings.queue.queue, passive=True
            )
            return int(declared.method.message_count)
        finally:
            connection.close()

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
    _delete_queues(isolated.queue)


def _delete_queues(queue: QueueSettings) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(queue.url))
    channel = connection.channel()
    channel.queue_delete(queue.queue)
    channel.queue_delete(queue.dead_letter_queue)
    connection.close()


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
    # The node reaches a storage endpoint where nothing listens: every download is transient.
    stack.env["MINIO_ENDPOINT"] = "127.0.0.1:9"
    stack.start_node("--processes", "1")
    wait_for(lambda: probe.status(image_id) == "failed", timeout=90)
    error = stack.api.get(f"/api/v1/images/{image_id}").json["error"]
    assert "gave up after 3 attempts" in error
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
    stack: IsolatedStack, probe: StackProbe
) -> None:
    """Queue arguments cannot change after creation: a deployment whose queue was made with
    another delivery limit must keep working rather than refuse every publish."""
    from common.broker import dead_letter_queue_arguments, job_queue_arguments

    older = dataclasses.replace(stack.settings.queue, delivery_limit=3)
    connection = pika.BlockingConnection(pika.URLParameters(older.url))
    channel = connection.channel()
    channel.queue_delete(older.queue)
    channel.queue_declare(
        older.dead_letter_queue, durable=True, arguments=dead_letter_queue_arguments()
    )
    channel.queue_declare(older.queue, durable=True, arguments=job_queue_arguments(older))
    connection.close()

    [image_id] = stack.upload_many(1, 900, 600)
    stack.start_node("--processes", "1")
    wait_for(lambda: probe.status(image_id) == "completed", timeout=60)


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
        assert sweeper.sweep_once() == 1
        assert sweeper.sweep_once() == 0, "a swept row is marked enqueued"
    finally:
        db.close()
    stack.start_node("--processes", "1")
    wait_for(lambda: probe.status(image_id) == "completed", timeout=60)
    assert_all_completed_once(probe, user_id, [str(image_id)])


@pytest.mark.stack_env(RABBITMQ_HEARTBEAT_SECONDS="1", WORKER_MEMORY_MB="16")
def test_heartbeats_are_served_while_a_long_batch_runs(
    stack: IsolatedStack, probe: StackProbe, user_id: str
) -> None:
    """With a 1 s heartbeat the broker drops a connection silent for about 2 s. One batch of
    large images rendered large (2400 px) through one CPU process takes several seconds, so
    only a consumer that keeps serving the connection while the batch runs keeps it."""
    from datetime import datetime

    large = jpeg(4032, 3024)
    # 48 of them: a batch of 24 has been seen to finish in under 3 s.
    ids = [stack.api.upload(large, f"large-{i}.jpg").json["id"] for i in range(48)]
    stack.env["TARGET_WIDTH"] = "2400"
    stack.start_node("--processes", "1", "--batch-size", "48", "--batch-wait-ms", "3000")
    wait_for(lambda: all(probe.status(i) == "completed" for i in ids), timeout=240)
    log = stack.logs.read_text()
    lines = log.splitlines()

    def stamp(found: Callable[[str], object]) -> datetime:
        line = next(line for line in lines if found(line))
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")

    def whole_batch(line: str) -> bool:
        timing = BatchTiming.find_in(line)
        return timing is not None and timing.size == 48

    started = stamp(lambda line: "consuming from" in line)
    batch_seconds = (stamp(whole_batch) - started).total_seconds()
    assert batch_seconds > 3, f"the batch took {batch_seconds:.1f}s: too short to prove anything"
    assert "lost RabbitMQ" not in log and "connection closed" not in log.lower()
    assert_all_completed_once(probe, user_id, ids)
