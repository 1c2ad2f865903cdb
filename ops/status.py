"""`python -m ops status`: one screen of what the pipeline is doing, read from the services.

It owns the operator's read-only view: job and dead-letter queue depths (RabbitMQ), live worker
nodes from their heartbeat hashes and the desired process count (Redis), and throughput, failure
reasons, images by status and the webhook backlog (PostgreSQL). A service that does not answer
is named in `errors`; the other sections are still shown. `python -m ops node-check` is the
worker's liveness probe.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import psycopg
import redis

from common.config import Settings
from db.image_stats import count_by_status, recent_outcomes, top_failure_reasons
from db.webhook_deliveries import Backlog, backlog
from ops.connections import SERVICE_ERRORS, broker_connection, database, redis_client
from ops.pipeline_state import (
    NodeState,
    QueueState,
    ScalingOverride,
    inspect_queue,
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
    with broker_connection(settings) as connection:
        return {
            "jobs": inspect_queue(connection, settings.queue.queue),
            "dead_letter": inspect_queue(connection, settings.queue.dead_letter_queue),
        }


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
