"""`python -m ops status`: one screen of what the pipeline is doing, read from the services.

It owns the operator's read-only view: job queue depths, all together (`jobs`) and per lane and
shard, and the dead-letter queue's (RabbitMQ), live worker
nodes from their heartbeat hashes and the desired process count (Redis), and throughput, failure
reasons, images by status and the webhook backlog (PostgreSQL). A service that does not answer
is named in `errors`; the other sections are still shown. `python -m ops node-check` is the
worker's liveness probe.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from common.config import Settings
from common.node_health import STALL_MARGIN_SECONDS, HealthRecordUnreadable, read_health_record
from db.image_stats import count_by_status, recent_outcomes, top_failure_reasons
from db.webhook_deliveries import Backlog, backlog
from ops.connections import SERVICE_ERRORS, broker_connection, database, redis_client
from ops.pipeline_state import (
    NodeState,
    QueueState,
    ScalingOverride,
    all_jobs,
    inspect_queue,
    job_queue_states,
    live_nodes,
    scaling_override,
)

T = TypeVar("T")

THROUGHPUT_WINDOW_SECONDS = 60
FAILURE_WINDOW = "1 hour"
TOP_FAILURES = 5


# --- what the report holds ----------------------------------------------------------------------


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
    scaling_override: ScalingOverride | None = None
    throughput: Throughput | None = None
    failures: list[FailureReason] = field(default_factory=list)
    images: dict[str, int] = field(default_factory=dict)
    webhooks: Backlog | None = None
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
            "scaling_override": asdict(self.scaling_override) if self.scaling_override else None,
            "throughput": throughput,
            "failures": [asdict(failure) for failure in self.failures],
            "images": self.images,
            "webhooks": asdict(self.webhooks) if self.webhooks else None,
            "errors": self.errors,
        }


# --- RabbitMQ -----------------------------------------------------------------------------------


def queue_states(settings: Settings) -> dict[str, QueueState]:
    """`jobs` (every job queue together, named after RABBITMQ_QUEUE), each lane and shard by its
    label, and `dead_letter`."""
    with broker_connection(settings) as connection:
        lanes = job_queue_states(connection, settings.queue)
        dead = inspect_queue(connection, settings.queue.dead_letter_queue)
    return {"jobs": all_jobs(settings.queue.queue, lanes), **lanes, "dead_letter": dead}


# --- Redis --------------------------------------------------------------------------------------


def redis_view(settings: Settings) -> tuple[list[NodeState], ScalingOverride | None]:
    client = redis_client(settings)
    try:
        prefix = settings.redis_prefix
        return live_nodes(client, prefix), scaling_override(client, prefix)
    finally:
        client.close()


# --- PostgreSQL ---------------------------------------------------------------------------------


def throughput(conn: psycopg.Connection[Any]) -> Throughput:
    completed, failed = recent_outcomes(conn, THROUGHPUT_WINDOW_SECONDS)
    return Throughput(THROUGHPUT_WINDOW_SECONDS, completed, failed)


def top_failures(conn: psycopg.Connection[Any]) -> list[FailureReason]:
    reasons = top_failure_reasons(conn, FAILURE_WINDOW, TOP_FAILURES)
    return [FailureReason(reason, count) for reason, count in reasons]


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
    nodes_and_override = _section(report, "redis", lambda: redis_view(settings))
    if nodes_and_override is not None:
        report.nodes, report.scaling_override = nodes_and_override
        override = report.scaling_override
        report.desired_processes = override.processes if override else None

    def read_database() -> None:
        with database(settings) as conn:
            report.throughput = throughput(conn)
            report.failures = top_failures(conn)
            report.images = count_by_status(conn)
            report.webhooks = backlog(conn)

    _section(report, "postgresql", read_database)
    return report


def render_text(report: StatusReport) -> str:
    """The human screen: queues, nodes, throughput, failures, images, errors."""
    lines = ["queues"]
    for role, queue in report.queues.items():
        state = "" if queue.exists else "  (not declared yet)"
        # The total is named after RABBITMQ_QUEUE, like the base queue: say what it sums.
        name = f"{queue.name}*" if role == "jobs" else queue.name
        lines.append(
            f"  {role:<12} {name:<32} messages {queue.messages:>8}  "
            f"consumers {queue.consumers:>3}{state}"
        )
    if "jobs" in report.queues:
        lines.append("  (* every job queue together: the lanes, their shards and the base queue)")
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
    if report.webhooks is not None:
        lines.append(_render_webhooks(report.webhooks))
    lines += [f"UNAVAILABLE {name}: {message}" for name, message in report.errors.items()]
    return "\n".join(lines)


def _render_webhooks(webhooks: Backlog) -> str:
    oldest = (
        ""
        if webhooks.oldest_age_seconds is None
        else f", oldest {webhooks.oldest_age_seconds:.0f}s old"
    )
    return (
        f"webhooks: {webhooks.undelivered} undelivered{oldest}; "
        f"{webhooks.abandoned} abandoned after retrying"
    )


def _render_nodes(report: StatusReport) -> list[str]:
    override = report.scaling_override
    desired = "unset" if report.desired_processes is None else str(report.desired_processes)
    total = sum(node.processes for node in report.nodes)
    lines = [f"worker nodes: {len(report.nodes)} live, {total} processes (desired/node: {desired})"]
    if override is not None:
        lines.append(f"  override in effect: {override.describe()}")
    if report.nodes:
        lines.append(
            f"  {'host':<24} {'pid':>7} {'procs':>5} {'cores':>5} {'completed':>10} "
            f"{'failed':>8} {'age':>6}"
        )
    for node in report.nodes:
        cores = str(node.cores) if node.cores else "?"
        lines.append(
            f"  {node.host:<24} {node.pid:>7} {node.processes:>5} {cores:>5} "
            f"{node.completed:>10} {node.failed:>8} {node.heartbeat_age_seconds:>5.1f}s"
        )
        if node.paused_dependency:
            lines.append(f"    {describe_pause(node)}")
    return lines


def describe_pause(node: NodeState) -> str:
    """ "paused: object storage unreachable since 04:12:09 UTC" for a node holding its work."""
    since = datetime.datetime.fromtimestamp(node.paused_since, datetime.UTC)
    return f"paused: {node.paused_dependency} unreachable since {since:%H:%M:%S} UTC"


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
    """Exit 0 while the worker node on this machine gets its work done (liveness probe).

    Reads the node's local health record (WORKER_HEALTH_FILE), never Redis: a node fails when
    its control loop stopped writing the record, or when it holds images and made no progress
    for longer than a render may take (MAX_RENDER_SECONDS) plus `--margin`. An idle node, a
    paused one, and one whose Redis is away all pass.
    """
    parser = argparse.ArgumentParser(prog="python -m ops node-check")
    parser.add_argument("--file", help="the health record (default: WORKER_HEALTH_FILE)")
    parser.add_argument(
        "--margin",
        type=float,
        default=STALL_MARGIN_SECONDS,
        help="seconds beyond MAX_RENDER_SECONDS a node holding work may go without progress",
    )
    args = parser.parse_args(argv)
    path = Path(args.file or (settings or Settings.from_env()).engine.health_file)
    now = time.time()
    try:
        record = read_health_record(path)
    except HealthRecordUnreadable as exc:
        print(f"node-check: {exc}", file=sys.stderr)
        return 1
    problem = record.problem(now, margin_seconds=args.margin)
    if problem is not None:
        print(f"node-check: the node is stuck: {problem}", file=sys.stderr)
        return 1
    print(f"node-check: {record.describe(now)}")
    return 0
