"""The reliability promise under faults: storage, a worker node, Redis, RabbitMQ or PostgreSQL
goes away in the middle of a run and comes back; afterwards every accepted upload is `completed`
(or `failed` with a reason, for the deliberately bad ones), with exactly one result object each,
and nothing was left behind by the uploads refused meanwhile.

The stack of this module has its own SeaweedFS and its own Redis, and reaches the shared
PostgreSQL and RabbitMQ through proxies of its own, so its faults reach no other test."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from common.broker import delete_topology, queue_depth
from common.config import QueueSettings, Settings
from common.storage import ObjectStore
from ops.s3server import LocalS3Server, pick_free_s3_port
from tests.faults import (
    PrivateRedis,
    Tally,
    TcpProxy,
    UploadLog,
    account,
    first_completion_after,
    terminal_count,
    upload_until_accepted,
)
from tests.support import (
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    ApiClient,
    StackProbe,
    jpeg,
    kill_tree,
    start_worker,
    stop_worker,
    wait_for,
)

pytestmark = pytest.mark.slow

IMAGES_PER_SCENARIO = 150
OUTAGE_SECONDS = 3.0
SETTLE_SECONDS = 120.0


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


@dataclasses.dataclass
class Infrastructure:
    """What this module owns: storage, Redis, and the proxies to PostgreSQL and RabbitMQ."""

    s3: LocalS3Server
    redis: PrivateRedis
    postgres: TcpProxy
    rabbitmq: TcpProxy
    recoveries: dict[str, float] = dataclasses.field(default_factory=dict)


@pytest.fixture(scope="module")
def infra(env, settings, tmp_path_factory) -> Iterator[Infrastructure]:
    root = tmp_path_factory.mktemp("faults")
    s3 = LocalS3Server(
        root / "s3", port=pick_free_s3_port(), access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY
    )
    s3.start()
    private_redis = PrivateRedis(root / "redis.log")
    private_redis.start()
    postgres = TcpProxy(urlsplit(env["POSTGRES_URL"]).port or 5432)
    rabbitmq = TcpProxy(urlsplit(env["RABBITMQ_URL"]).port or 5672)
    postgres.start()
    rabbitmq.start()
    built = Infrastructure(s3, private_redis, postgres, rabbitmq)
    yield built
    if built.recoveries:
        worst = max(built.recoveries, key=built.recoveries.__getitem__)
        print(f"\nworst recovery: {built.recoveries[worst]:.2f} s ({worst})")
    postgres.close()
    rabbitmq.close()
    private_redis.kill()
    s3.stop()


@dataclasses.dataclass
class FaultStack:
    """An API and worker nodes whose every dependency a test may take away."""

    env: dict[str, str]
    settings: Settings
    # The queues as reached without the proxy, so a witness sees through a broker outage.
    direct_queue: QueueSettings
    api: ApiClient
    probe: StackProbe
    owner: str
    logs: Path
    nodes: list[subprocess.Popen[bytes]] = dataclasses.field(default_factory=list)

    def start_node(self, *args: str) -> subprocess.Popen[bytes]:
        node = start_worker(self.env, self.node_log(len(self.nodes)), *args)
        self.nodes.append(node)
        return node

    def node_log(self, index: int) -> Path:
        return self.logs / f"node-{index}.log"

    def wait_until_consuming(self, index: int) -> None:
        """A node SIGTERMed before it installed its handlers just dies; wait until it serves."""
        log = self.node_log(index)
        wait_for(lambda: log.exists() and b"consuming from" in log.read_bytes(), 60)


@pytest.fixture
def stack(env, infra, issuer, user_id, tmp_path) -> Iterator[FaultStack]:
    from ingest.app import Dependencies, create_app

    name = uuid.uuid4().hex[:8]
    stack_env = {
        **env,
        "POSTGRES_URL": with_port(env["POSTGRES_URL"], infra.postgres.port),
        "RABBITMQ_URL": with_port(env["RABBITMQ_URL"], infra.rabbitmq.port),
        "RABBITMQ_QUEUE": f"pm-fault-{name}",
        "REDIS_URL": infra.redis.url,
        "REDIS_PREFIX": f"pmfault:{name}:",
        "MINIO_ENDPOINT": infra.s3.endpoint,
        "MINIO_RAW_BUCKET": f"raw-{name}",
        "MINIO_PROCESSED_BUCKET": f"processed-{name}",
    }
    settings = Settings.from_env(stack_env)
    ObjectStore(settings.storage).ensure_buckets()
    # The witness looks at the database directly, so it sees through a database outage.
    probe = StackProbe(Settings.from_env({**stack_env, "POSTGRES_URL": env["POSTGRES_URL"]}))
    deps = Dependencies.connect(settings)
    api = ApiClient(create_app(settings, deps), issuer.mint_token(user_id, ("user",)))
    direct_queue = dataclasses.replace(settings.queue, url=env["RABBITMQ_URL"])
    built = FaultStack(stack_env, settings, direct_queue, api, probe, user_id, tmp_path)
    yield built
    for node in built.nodes:
        if node.poll() is None:
            stop_worker(node)
    deps.close()
    delete_topology(direct_queue)


@functools.cache
def workload(count: int) -> tuple[tuple[tuple[str, bytes], ...], frozenset[str]]:
    """`count` small JPEGs; every 30th (from the 8th) is cut in half: accepted, then `failed`."""
    images, bad = [], set()
    for i in range(count):
        data = jpeg(640, 480, seed=i)
        name = f"img-{i}.jpg"
        if i % 30 == 7:
            data, name = data[: len(data) // 2], f"truncated-{i}.jpg"
            bad.add(name)
        images.append((name, data))
    return tuple(images), frozenset(bad)


def upload_all(stack: FaultStack, images: list[tuple[str, bytes]], log: UploadLog) -> None:
    deadline = time.monotonic() + 90
    for name, data in images:
        if log.cancelled.is_set():
            return
        upload_until_accepted(stack.api, name, data, log, deadline)


def settle(stack: FaultStack, log: UploadLog) -> None:
    """Wait until every accepted upload is terminal and the job queue is empty."""
    accepted = len(log.accepted)
    wait_for(lambda: terminal_count(stack.probe, stack.owner) >= accepted, SETTLE_SECONDS, 0.2)
    wait_for(lambda: queue_depth(stack.direct_queue) == 0, 30, what="an empty job queue")
    assert queue_depth(stack.direct_queue, stack.direct_queue.dead_letter_queue) == 0


def report(infra: Infrastructure, scenario: str, tally: Tally, recovery: float | None) -> None:
    if recovery is not None:
        infra.recoveries[scenario] = recovery
    shown = "n/a" if recovery is None else f"{recovery:.2f} s"
    print(
        f"\n[{scenario}] uploads sent={tally.sent} accepted={tally.accepted} "
        f"refused_503={tally.refused_503} completed={tally.completed} failed={tally.failed} "
        f"lost={tally.lost} duplicates={tally.duplicates} recovery={shown}"
    )


def run_through_fault(stack: FaultStack, inject: Callable[[], None]) -> tuple[Tally, float]:
    """A backlog, a node working on it, the fault (with uploads arriving meanwhile), then more
    uploads; returns the accounting and the seconds from the fault's end to the next completion."""
    images, bad = workload(IMAGES_PER_SCENARIO)
    before, during, after = list(images[:60]), list(images[60:110]), list(images[110:])
    log = UploadLog()
    upload_all(stack, before, log)
    stack.start_node("--processes", "2", "--batch-size", "8")
    wait_for(lambda: terminal_count(stack.probe, stack.owner) > 0, 60, 0.01)
    uploader = threading.Thread(target=upload_all, args=(stack, during, log))
    uploader.start()
    try:
        inject()
        fault_ended = time.time()
    except BaseException:
        log.cancelled.set()
        raise
    finally:
        uploader.join()
    upload_all(stack, after, log)
    settle(stack, log)
    tally = account(stack.probe, stack.owner, log, set(bad))
    assert tally.lost == 0 and tally.duplicates == 0
    assert tally.accepted == IMAGES_PER_SCENARIO
    recovered = first_completion_after(stack.probe, stack.owner, fault_ended)
    assert recovered is not None, "nothing completed after the fault ended"
    return tally, max(0.0, recovered - fault_ended)


def test_storage_restart_mid_run_loses_nothing(stack: FaultStack, infra: Infrastructure) -> None:
    def restart_storage() -> None:
        infra.s3.stop()
        time.sleep(OUTAGE_SECONDS)
        infra.s3.start()

    tally, recovery = run_through_fault(stack, restart_storage)
    report(infra, "S3 restart", tally, recovery)


def test_sigkilled_node_mid_batch_is_replaced_without_loss(
    stack: FaultStack, infra: Infrastructure
) -> None:
    def kill_and_replace() -> None:
        kill_tree(stack.nodes[-1])
        time.sleep(1.0)
        stack.start_node("--processes", "2", "--batch-size", "8")

    tally, recovery = run_through_fault(stack, kill_and_replace)
    report(infra, "node kill -9", tally, recovery)


def test_redis_restart_mid_run_loses_nothing(stack: FaultStack, infra: Infrastructure) -> None:
    def restart_redis() -> None:
        infra.redis.kill()
        time.sleep(OUTAGE_SECONDS)
        infra.redis.start()

    tally, recovery = run_through_fault(stack, restart_redis)
    report(infra, "Redis restart", tally, recovery)


def test_rabbitmq_connections_dropped_mid_run_lose_nothing(
    stack: FaultStack, infra: Infrastructure
) -> None:
    def drop_broker() -> None:
        infra.rabbitmq.pause()
        time.sleep(OUTAGE_SECONDS)
        infra.rabbitmq.resume()

    tally, recovery = run_through_fault(stack, drop_broker)
    report(infra, "RabbitMQ connections dropped", tally, recovery)


def test_postgres_unreachable_mid_run_loses_nothing(
    stack: FaultStack, infra: Infrastructure
) -> None:
    def drop_database() -> None:
        infra.postgres.pause()
        time.sleep(OUTAGE_SECONDS)
        infra.postgres.resume()

    tally, recovery = run_through_fault(stack, drop_database)
    report(infra, "PostgreSQL unreachable", tally, recovery)


def accepted_at_least(log: UploadLog, count: int) -> bool:
    return len(log.accepted) >= count


LOAD_IMAGES = 160
LOAD_CLIENTS = 4


def test_concurrent_load_while_nodes_are_sigtermed_and_restarted_twice(
    stack: FaultStack, infra: Infrastructure
) -> None:
    images, bad = workload(LOAD_IMAGES)
    log = UploadLog()
    for _ in range(2):
        stack.start_node("--processes", "1", "--batch-size", "8")
    clients = [
        threading.Thread(target=upload_all, args=(stack, list(images[i::LOAD_CLIENTS]), log))
        for i in range(LOAD_CLIENTS)
    ]
    started = time.monotonic()
    for client in clients:
        client.start()
    restarts = 0
    try:
        for round_number in range(2):
            wait_for(functools.partial(accepted_at_least, log, 50 * (round_number + 1)), 60)
            stack.wait_until_consuming(round_number)
            assert stop_worker(stack.nodes[round_number], timeout=60) == 0
            stack.start_node("--processes", "1", "--batch-size", "8")
            restarts += 1
    finally:
        if restarts < 2:
            log.cancelled.set()
        for client in clients:
            client.join()
    settle(stack, log)
    tally = account(stack.probe, stack.owner, log, set(bad))
    assert tally.accepted == LOAD_IMAGES and tally.lost == 0 and tally.duplicates == 0
    print(f"\n[load] {restarts} SIGTERM restarts in {time.monotonic() - started:.1f} s")
    report(infra, "load with SIGTERMed nodes", tally, None)
