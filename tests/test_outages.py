"""Outages pause, they don't fail: object storage or PostgreSQL unreachable for longer than the
delivery limit's worth of attempts would last, then back. The node holds its work, says it is
paused and why, resumes by itself, and every image completes without using an attempt.

The delivery limit is 3 here: without the pause, each image would burn its three deliveries
within seconds of the outage's start and end `failed` ("gave up after 3 attempts").
This module runs its own SeaweedFS and reaches PostgreSQL through a proxy of its own, so its
outages reach no other test."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from prometheus_client import REGISTRY

from common.broker import delete_topology, queue_depth
from common.config import Settings
from common.errors import DependencyUnavailable
from common.node_control import Heartbeat, heartbeat_key
from common.storage import ObjectStore
from engine.dependencies import DependencyGate, GateStopped, probe_delay
from ops.s3server import LocalS3Server, pick_free_s3_port
from ops.status import collect_status, node_check_command, status_command
from tests.faults import TcpProxy
from tests.support import (
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    ApiClient,
    StackProbe,
    jpeg,
    start_worker,
    stop_worker,
    wait_for,
)

pytestmark = pytest.mark.slow

DELIVERY_LIMIT = 3
IMAGES = 12
# Long enough for today's nack-and-requeue to have used all three deliveries several times over.
OUTAGE_SECONDS = 30.0
PAUSE_LINE = b"unreachable: pausing"
RESUME_LINE = b"answers again after"
REQUEUE_LINE = b"messages requeued"


@dataclasses.dataclass
class Dependencies:
    """This module's object store, and its way to PostgreSQL."""

    s3: LocalS3Server
    postgres: TcpProxy


@pytest.fixture(scope="module")
def dependencies(env, tmp_path_factory) -> Iterator[Dependencies]:
    root = tmp_path_factory.mktemp("outages")
    s3 = LocalS3Server(
        root / "s3", port=pick_free_s3_port(), access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY
    )
    s3.start()
    postgres = TcpProxy(urlsplit(env["POSTGRES_URL"]).port or 5432)
    postgres.start()
    yield Dependencies(s3, postgres)
    postgres.close()
    s3.stop()


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.netloc.rsplit(':', 1)[0]}:{port}"))


@dataclasses.dataclass
class OutageStack:
    """An API on the direct services and one worker node whose storage and database can go."""

    node_env: dict[str, str]
    # The stack's services reached directly, as a witness and operator see them.
    settings: Settings
    api: ApiClient
    probe: StackProbe
    owner: str
    log: Path
    node: subprocess.Popen[bytes] | None = None

    def upload(self, count: int) -> list[str]:
        ids = []
        for i in range(count):
            response = self.api.upload(jpeg(640, 480, seed=i), f"img-{i}.jpg")
            assert response.status_code == 201, response.text
            ids.append(response.json["id"])
        return ids

    def start_node(self) -> None:
        self.node = start_worker(self.node_env, self.log, "--processes", "1", "--batch-size", "4")

    def statuses(self) -> dict[str, str]:
        return {str(row[0]): row[1] for row in self.probe.rows_for(self.owner)}

    def paused_nodes(self) -> list[tuple[str, float]]:
        """(dependency, since) of each live node that `ops status --json` shows paused."""
        nodes = collect_status(self.settings).to_json()["nodes"]
        # .get: a node without the fields (older code) reads as not paused, not as an error.
        paused = [(n.get("paused_dependency"), n.get("paused_since")) for n in nodes]
        return [(dependency, since) for dependency, since in paused if dependency]

    def claims(self) -> list[int]:
        """How many times each of the owner's images was claimed by a node."""
        with psycopg.connect(self.settings.postgres_url) as conn:
            rows = conn.execute("SELECT attempts FROM images WHERE owner = %s", (self.owner,))
            return [int(row[0]) for row in rows]

    def wait_until_paused(self) -> list[tuple[str, float]]:
        return wait_for(
            self.paused_nodes, 60, 0.5, what=lambda: f"a node shown paused {self.describe()}"
        )

    def describe(self) -> str:
        """The images' statuses, for a failed wait's message."""
        return f"(images: {dict(collections.Counter(self.statuses().values()))})"


@pytest.fixture
def stack(env, settings, dependencies, issuer, user_id, tmp_path) -> Iterator[OutageStack]:
    """`settings` is asked for its migrated schema; the stack has its own queue and buckets."""
    from ingest.app import Dependencies as ApiDependencies
    from ingest.app import create_app

    name = uuid.uuid4().hex[:8]
    direct_env = {
        **env,
        "RABBITMQ_QUEUE": f"pm-outage-{name}",
        "RABBITMQ_DELIVERY_LIMIT": str(DELIVERY_LIMIT),
        "REDIS_PREFIX": f"pmoutage:{name}:",
        "MINIO_ENDPOINT": dependencies.s3.endpoint,
        "MINIO_RAW_BUCKET": f"raw-{name}",
        "MINIO_PROCESSED_BUCKET": f"processed-{name}",
    }
    own = Settings.from_env(direct_env)
    ObjectStore(own.storage).ensure_buckets()
    node_env = {
        **direct_env,
        "POSTGRES_URL": with_port(env["POSTGRES_URL"], dependencies.postgres.port),
        "WORKER_HEALTH_FILE": str(tmp_path / "node-health.json"),
    }
    deps = ApiDependencies.connect(own)
    api = ApiClient(create_app(own, deps), issuer.mint_token(user_id, ("user",)))
    built = OutageStack(node_env, own, api, StackProbe(own), user_id, tmp_path / "node.log")
    yield built
    if built.node is not None:
        stop_worker(built.node)
    deps.close()
    delete_topology(own.queue)


@dataclasses.dataclass
class Timeline:
    """Seconds from the outage's start to each event of one scenario."""

    scenario: str
    started: float
    events: list[tuple[str, float]] = dataclasses.field(default_factory=list)

    def mark(self, event: str, at: float | None = None) -> None:
        self.events.append((event, (time.time() if at is None else at) - self.started))

    def show(self) -> str:
        lines = [f"[{self.scenario}] timeline (seconds after the outage began)"]
        lines += [f"  {seconds:6.1f}  {event}" for event, seconds in self.events]
        return "\n".join(lines)


@contextlib.contextmanager
def away(cut: Callable[[], None], restore: Callable[[], None]) -> Iterator[None]:
    """A dependency cut for the block, and restored at its end whatever happens in it."""
    cut()
    try:
        yield
    finally:
        restore()


def ride_out(
    stack: OutageStack, dependency: str, cut: Callable[[], None], restore: Callable[[], None]
) -> Timeline:
    """Queue the images, cut the dependency, start the node, wait until it says it is paused,
    keep the dependency away for OUTAGE_SECONDS in all, restore it, wait for every image."""
    ids = stack.upload(IMAGES)
    timeline = Timeline(dependency, time.time())
    with away(cut, restore):
        stack.start_node()
        [(paused_for, since)] = stack.wait_until_paused()
        assert paused_for == dependency
        timeline.mark("node shown paused by ops status (its paused_since)", since)
        # Restarting a node would not bring the dependency back: the liveness probe passes.
        health = ["--file", stack.node_env["WORKER_HEALTH_FILE"]]
        wait_for(lambda: node_check_command(health) == 0, 10, 0.5, what="node-check passing")
        time.sleep(max(0.0, timeline.started + OUTAGE_SECONDS - time.time()))
        assert "failed" not in stack.statuses().values(), "the outage failed an image"
        assert stack.paused_nodes(), "the node resumed while the dependency was still away"
    timeline.mark(f"{dependency} back")
    wait_for(lambda: not stack.paused_nodes(), 60, 0.5, what="the node resuming")
    timeline.mark("node shown working again")
    wait_for(
        lambda: set(stack.statuses().values()) == {"completed"},
        90,
        0.2,
        what=lambda: f"every image completed {stack.describe()}",
    )
    timeline.mark(f"all {IMAGES} images completed")
    assert sorted(stack.statuses()) == sorted(ids)
    wait_for(lambda: queue_depth(stack.settings.queue) == 0, 30, what="an empty job queue")
    dead = queue_depth(stack.settings.queue, stack.settings.queue.dead_letter_queue)
    assert dead == 0
    print("\n" + timeline.show())
    return timeline


def assert_paused_once_and_used_no_attempt(stack: OutageStack, probe: StackProbe) -> None:
    log = stack.log.read_bytes()
    assert log.count(PAUSE_LINE) == 1 and log.count(RESUME_LINE) == 1, log.decode()[-3000:]
    # Nothing went back to the queue: no delivery of any image was used by the outage, and
    # each image was claimed once (a requeued job is claimed again on its next delivery).
    assert REQUEUE_LINE not in log, log.decode()[-3000:]
    assert stack.claims() == [1] * IMAGES
    assert len(probe.results()) == IMAGES


def test_storage_outage_pauses_the_node_and_fails_no_image(
    stack: OutageStack, dependencies: Dependencies
) -> None:
    ride_out(stack, "object storage", dependencies.s3.stop, dependencies.s3.start)
    assert_paused_once_and_used_no_attempt(stack, stack.probe)


def test_database_outage_pauses_the_node_and_fails_no_image(
    stack: OutageStack, dependencies: Dependencies
) -> None:
    ride_out(stack, "database", dependencies.postgres.pause, dependencies.postgres.resume)
    assert_paused_once_and_used_no_attempt(stack, stack.probe)


def test_sigterm_while_paused_gives_the_held_work_back_and_fails_nothing(
    stack: OutageStack, dependencies: Dependencies
) -> None:
    ids = stack.upload(IMAGES)
    with away(dependencies.s3.stop, dependencies.s3.start):
        stack.start_node()
        stack.wait_until_paused()
        assert stack.node is not None
        assert stop_worker(stack.node, timeout=60) == 0
        assert "failed" not in stack.statuses().values()
        assert sorted(stack.statuses()) == sorted(ids)
        # Every job is back in the queue for the next node.
        wait_for(lambda: queue_depth(stack.settings.queue) == IMAGES, 30, what="the jobs back")


# --- how a pause is shown, and the probes' spacing -----------------------------------------------


def test_status_shows_a_paused_node_with_its_reason(
    private_queue: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    since = datetime.datetime(2026, 3, 1, 4, 12, 9, tzinfo=datetime.UTC).timestamp()
    client = redis.Redis.from_url(private_queue.redis_url, decode_responses=True)
    key = heartbeat_key(private_queue.redis_prefix, "node-a", 4242)
    beat = Heartbeat(2, 10, 0, 3, since - 60, time.time(), private_queue.queue.queue)
    paused = dataclasses.replace(beat, paused_dependency="object storage", paused_since=since)
    client.hset(key, mapping=paused.to_hash())
    client.expire(key, 30)

    status_command([], private_queue)
    assert "paused: object storage unreachable since 04:12:09 UTC" in capsys.readouterr().out

    client.hset(key, mapping=beat.to_hash())
    status_command([], private_queue)
    assert "paused" not in capsys.readouterr().out


def test_probe_delays_double_up_to_the_cap_and_spread_over_its_upper_half() -> None:
    lowest = [probe_delay(n, 0.5, 15.0, lambda: 0.0) for n in range(1, 9)]
    highest = [probe_delay(n, 0.5, 15.0, lambda: 1.0) for n in range(1, 9)]
    assert highest == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    assert lowest == [delay / 2 for delay in highest]


FAST_PROBES = {"first_probe_seconds": 0.01, "max_probe_seconds": 0.05}


def _paused_gauge(dependency: str) -> float | None:
    return REGISTRY.get_sample_value("pixelmill_engine_paused", {"dependency": dependency})


def test_a_gate_holds_every_caller_until_the_probe_answers_and_shows_the_pause() -> None:
    answering, probes = threading.Event(), []

    def probe() -> None:
        probes.append(time.monotonic())
        if not answering.is_set():
            raise DependencyUnavailable("object storage")

    gate = DependencyGate({"object storage": probe}, **FAST_PROBES)
    with ThreadPoolExecutor(3) as callers:
        held = [callers.submit(gate.hold_if_down, "object storage") for _ in range(3)]
        wait_for(lambda: len(probes) > 5, 10, 0.01, what="the gate probing again")
        assert gate.paused() and _paused_gauge("object storage") == 1
        assert not any(caller.done() for caller in held)
        answering.set()
        assert [caller.result(timeout=10) for caller in held] == [True, True, True]
    assert not gate.paused() and _paused_gauge("object storage") == 0
    # The store answers: the next failure is the caller's own, and nobody is held.
    assert gate.hold_if_down("object storage") is False


def test_a_stopping_gate_gives_the_held_callers_back() -> None:
    def down() -> None:
        raise DependencyUnavailable("database")

    gate = DependencyGate({"database": down}, **FAST_PROBES)
    with ThreadPoolExecutor(2) as callers:
        held = [callers.submit(gate.hold_if_down, "database") for _ in range(2)]
        wait_for(gate.paused, 10, 0.01, what="the gate pausing")
        gate.stop()
        for caller in held:
            with pytest.raises(GateStopped):
                caller.result(timeout=10)
    assert not gate.paused()
