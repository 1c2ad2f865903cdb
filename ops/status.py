"""`python -m ops status`: one screen of what the pipeline is doing, read from the services.

It owns the operator's read-only view: job and dead-letter queue depths (RabbitMQ), live worker
nodes from their heartbeat hashes and the desired process count (Redis), and throughput, failure
reasons and images by status (PostgreSQL). A service that does not answer is named in `errors`;
the other sections are still shown. `python -m ops node-check` is the worker's liveness probe.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pika
import pika.exceptions
import psycopg
import redis

from common.broker import BROKER_ERRORS, connection_parameters
from common.config import Settings
from db.images import STATUSES
from ops.services import ServicesUnavailable

T = TypeVar("T")

THROUGHPUT_WINDOW_SECONDS = 60
FAILURE_WINDOW = "1 hour"
TOP_FAILURES = 5
_NOT_FOUND = 404
SERVICE_ERRORS: tuple[type[Exception], ...] = (
    ServicesUnavailable,
    redis.RedisError,
    psycopg.Error,
    *BROKER_ERRORS,
)


# --- Redis keys shared with the engine (see engine/node.py) -----------------------------------


def processes_key(prefix: str) -> str:
    """Desired CPU processes per worker node (decimal string); nodes resize to it."""
    return f"{prefix}engine:processes"


def node_key(prefix: str, host: str, pid: int) -> str:
    """Heartbeat hash of one worker node, refreshed every 2 s and expiring after 10 s."""
    return f"{prefix}engine:nodes:{host}:{pid}"


def node_key_pattern(prefix: str, host: str = "*") -> str:
    return f"{prefix}engine:nodes:{host}:*"


# --- what the report holds ----------------------------------------------------------------------


@dataclass(frozen=True)
class QueueState:
    """Depth and consumers of one queue; `exists` is False when nobody has declared it yet."""

    name: str
    messages: int
    consumers: int
    exists: bool = True


@dataclass(frozen=True)
class NodeState:
    """One worker node as its last heartbeat describes it."""

    host: str
    pid: int
    processes: int
    completed: int
    failed: int
    batches: int
    queue: str
    started_at: float
    heartbeat: float
    heartbeat_age_seconds: float


@dataclass(frozen=True)
class Throughput:
    window_seconds: int
    completed: int
    failed: int

    @property
    def images_per_second(self) -> float:
        return round((self.completed + self.failed) / self.window_seconds, 2)


@dataclass(frozen=True)
class FailureReason:
    reason: str
    count: int


@dataclass
class StatusReport:
    """Everything `ops status` shows; sections whose service did not answer stay empty."""

    queues: dict[str, QueueState] = field(default_factory=dict)
    nodes: list[NodeState] = field(default_factory=list)
    desired_processes: int | None = None
    throughput: Throughput | None = None
    failures: list[FailureReason] = field(default_factory=list)
    images: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        throughput = None
        if self.throughput is not None:
            throughput = {
                **asdict(self.throughput),
                "images_per_second": self.throughput.images_per_second,
            }
        return {
            "queues": {role: asdict(state) for role, state in self.queues.items()},
            "nodes": [asdict(node) for node in self.nodes],
            "desired_processes": self.desired_processes,
            "throughput": throughput,
            "failures": [asdict(failure) for failure in self.failures],
            "images": self.images,
            "errors": self.errors,
        }


# --- RabbitMQ -----------------------------------------------------------------------------------


@contextmanager
def broker_connection(settings: Settings) -> Iterator[pika.BlockingConnection]:
    """A short-lived connection; failing to connect becomes ServicesUnavailable."""
    try:
        connection = pika.BlockingConnection(connection_parameters(settings.queue))
    except BROKER_ERRORS as exc:
        where = urlsplit(settings.queue.url).hostname
        raise ServicesUnavailable(f"RabbitMQ at {where}: {exc!r}") from exc
    try:
        yield connection
    finally:
        if connection.is_open:
            connection.close()


def inspect_queue(connection: pika.BlockingConnection, name: str) -> QueueState:
    """Passive declare on its own channel (a missing queue closes it): depth and consumers."""
    channel = connection.channel()
    try:
        frame = channel.queue_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != _NOT_FOUND:
            raise
        return QueueState(name, 0, 0, exists=False)
    channel.close()
    return QueueState(name, frame.method.message_count, frame.method.consumer_count)


def queue_states(settings: Settings) -> dict[str, QueueState]:
    with broker_connection(settings) as connection:
        return {
            "jobs": inspect_queue(connection, settings.queue.queue),
            "dead_letter": inspect_queue(connection, settings.queue.dead_letter_queue),
        }


# --- Redis --------------------------------------------------------------------------------------


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True
    )


def parse_node(key: str, fields: dict[str, str], now: float) -> NodeState | None:
    """A NodeState from a heartbeat hash; None for a hash that expired between scan and read."""
    if not fields:
        return None
    rest, _, pid = key.rpartition(":")
    host = rest.rpartition(":")[2]
    heartbeat = float(fields.get("heartbeat", 0) or 0)
    return NodeState(
        host=host,
        pid=int(pid),
        processes=int(fields.get("processes", 0) or 0),
        completed=int(fields.get("completed", 0) or 0),
        failed=int(fields.get("failed", 0) or 0),
        batches=int(fields.get("batches", 0) or 0),
        queue=fields.get("queue", ""),
        started_at=float(fields.get("started_at", 0) or 0),
        heartbeat=heartbeat,
        heartbeat_age_seconds=round(max(0.0, now - heartbeat), 1),
    )


def live_nodes(client: redis.Redis, prefix: str, host: str = "*") -> list[NodeState]:
    """Every node whose heartbeat hash has not expired, ordered by host and pid."""
    keys = sorted(client.scan_iter(match=node_key_pattern(prefix, host), count=500))
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    now = time.time()
    parsed = (
        parse_node(key, fields, now) for key, fields in zip(keys, pipe.execute(), strict=True)
    )
    return [node for node in parsed if node is not None]


def desired_processes(client: redis.Redis, prefix: str) -> int | None:
    raw = client.get(processes_key(prefix))
    return int(raw) if raw is not None else None


def redis_view(settings: Settings) -> tuple[list[NodeState], int | None]:
    client = redis_client(settings)
    try:
        prefix = settings.redis_prefix
        return live_nodes(client, prefix), desired_processes(client, prefix)
    finally:
        client.close()


# --- PostgreSQL ---------------------------------------------------------------------------------


def throughput(conn: psycopg.Connection[Any]) -> Throughput:
    row = conn.execute(
        """SELECT count(*) FILTER (WHERE status = 'completed'),
                  count(*) FILTER (WHERE status = 'failed')
             FROM images
            WHERE status IN ('completed', 'failed')
              AND updated_at > now() - make_interval(secs => %s)""",
        (THROUGHPUT_WINDOW_SECONDS,),
    ).fetchone()
    completed, failed = row if row is not None else (0, 0)
    return Throughput(THROUGHPUT_WINDOW_SECONDS, completed, failed)


def top_failures(conn: psycopg.Connection[Any]) -> list[FailureReason]:
    rows = conn.execute(
        """SELECT coalesce(error, '(none)'), count(*) FROM images
            WHERE status = 'failed' AND updated_at > now() - %s::interval
            GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT %s""",
        (FAILURE_WINDOW, TOP_FAILURES),
    ).fetchall()
    return [FailureReason(reason, count) for reason, count in rows]


def images_by_status(conn: psycopg.Connection[Any]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for status, count in conn.execute("SELECT status, count(*) FROM images GROUP BY status"):
        counts[status] = count
    return counts


@contextmanager
def database(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection; connection failures become ServicesUnavailable."""
    try:
        conn = psycopg.connect(settings.postgres_url, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as exc:
        raise ServicesUnavailable(f"PostgreSQL: {exc}") from exc
    with conn:
        yield conn


# --- the report ---------------------------------------------------------------------------------


def _section(report: StatusReport, name: str, read: Callable[[], T]) -> T | None:
    """Run one reader; a service error is recorded under `name` instead of ending the report."""
    try:
        return read()
    except SERVICE_ERRORS as exc:
        report.errors[name] = str(exc) or type(exc).__name__
        return None


def collect_status(settings: Settings) -> StatusReport:
    report = StatusReport()
    report.queues = _section(report, "rabbitmq", lambda: queue_states(settings)) or {}
    nodes_and_desired = _section(report, "redis", lambda: redis_view(settings))
    if nodes_and_desired is not None:
        report.nodes, report.desired_processes = nodes_and_desired

    def read_database() -> None:
        with database(settings) as conn:
            report.throughput = throughput(conn)
            report.failures = top_failures(conn)
            report.images = images_by_status(conn)

    _section(report, "postgresql", read_database)
    return report


def render_text(report: StatusReport) -> str:
    """The human screen: queues, nodes, throughput, failures, images, errors."""
    lines = ["queues"]
    for role, queue in report.queues.items():
        state = "" if queue.exists else "  (not declared yet)"
        lines.append(
            f"  {role:<12} {queue.name:<32} messages {queue.messages:>8}  "
            f"consumers {queue.consumers:>3}{state}"
        )
    lines += _render_nodes(report)
    if report.throughput is not None:
        t = report.throughput
        lines.append(
            f"last {t.window_seconds}s: completed {t.completed}, failed {t.failed} "
            f"({t.images_per_second} images/s)"
        )
    lines.append(f"failures in the last {FAILURE_WINDOW} (top {TOP_FAILURES})")
    lines += [f"  {f.count:>8}  {f.reason}" for f in report.failures] or ["  none"]
    if report.images:
        lines.append("images  " + "  ".join(f"{k} {v}" for k, v in report.images.items()))
    lines += [f"UNAVAILABLE {name}: {message}" for name, message in report.errors.items()]
    return "\n".join(lines)


def _render_nodes(report: StatusReport) -> list[str]:
    desired = "unset" if report.desired_processes is None else str(report.desired_processes)
    total = sum(node.processes for node in report.nodes)
    lines = [f"worker nodes: {len(report.nodes)} live, {total} processes (desired/node: {desired})"]
    if report.nodes:
        lines.append(
            f"  {'host':<24} {'pid':>7} {'procs':>5} {'completed':>10} {'failed':>8} {'age':>6}"
        )
    for node in report.nodes:
        lines.append(
            f"  {node.host:<24} {node.pid:>7} {node.processes:>5} {node.completed:>10} "
            f"{node.failed:>8} {node.heartbeat_age_seconds:>5.1f}s"
        )
    return lines


def status_command(argv: list[str], settings: Settings | None = None) -> int:
    """Queues, worker nodes, throughput and failures at a glance (--json for machines)."""
    parser = argparse.ArgumentParser(prog="python -m ops status")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    report = collect_status(settings or Settings.from_env())
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print(render_text(report))
    return 1 if report.errors else 0


def node_check_command(argv: list[str], settings: Settings | None = None) -> int:
    """Exit 0 while a worker node on this host has a fresh heartbeat (liveness probe)."""
    parser = argparse.ArgumentParser(prog="python -m ops node-check")
    parser.add_argument("--host", default=socket.gethostname(), help="default: this host")
    args = parser.parse_args(argv)
    settings = settings or Settings.from_env()
    client = redis_client(settings)
    try:
        nodes = live_nodes(client, settings.redis_prefix, args.host)
    except redis.RedisError as exc:
        print(f"node-check: Redis: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if not nodes:
        print(f"node-check: no live worker node on {args.host}", file=sys.stderr)
        return 1
    print(", ".join(f"{n.host}:{n.pid} heartbeat {n.heartbeat_age_seconds}s ago" for n in nodes))
    return 0
