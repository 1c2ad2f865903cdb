"""The running pipeline seen from outside, as the status screen and the autoscaler read it: the
depth and consumers of each job queue (every lane and shard) and of their sum, the live worker
nodes and the desired process count per node."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pika
import pika.exceptions
import redis

from common.broker import job_queues
from common.config import QueueSettings
from common.node_control import (
    Heartbeat,
    ScalingSource,
    desired_processes_key,
    heartbeat_key_pattern,
    node_of_heartbeat_key,
    scaling_source_key,
)

_NOT_FOUND = 404


@dataclass(frozen=True)
class QueueState:
    """Depth and consumers of one queue; `exists` is False when nobody has declared it yet."""

    name: str
    messages: int
    consumers: int
    exists: bool = True


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


def job_queue_states(
    connection: pika.BlockingConnection, settings: QueueSettings
) -> dict[str, QueueState]:
    """Each job queue by its label (`interactive`, `bulk.0`, ..., `base`), in serving order."""
    return {q.label: inspect_queue(connection, q.name) for q in job_queues(settings)}


def all_jobs(name: str, states: dict[str, QueueState]) -> QueueState:
    """The job queues as one: messages summed, consumers the most any one has (every node
    consumes each), declared when any is."""
    values = list(states.values())
    return QueueState(
        name,
        sum(s.messages for s in values),
        max((s.consumers for s in values), default=0),
        exists=any(s.exists for s in values),
    )


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
    cores: int = 0
    start_processes: int = 0
    # The dependency the node is paused for (holding its work until it answers), and since when.
    paused_dependency: str = ""
    paused_since: float = 0.0


def parse_node(key: str, fields: dict[str, str], now: float) -> NodeState | None:
    """A NodeState from a heartbeat hash; None for a hash that expired between scan and read."""
    if not fields:
        return None
    host, pid = node_of_heartbeat_key(key)
    beat = Heartbeat.from_hash(fields)
    return NodeState(
        host=host,
        pid=pid,
        processes=beat.processes,
        completed=beat.completed,
        failed=beat.failed,
        batches=beat.batches,
        queue=beat.queue,
        started_at=beat.started_at,
        heartbeat=beat.heartbeat,
        heartbeat_age_seconds=round(max(0.0, now - beat.heartbeat), 1),
        cores=beat.cores,
        start_processes=beat.start_processes,
        paused_dependency=beat.paused_dependency,
        paused_since=beat.paused_since,
    )


def live_nodes(client: redis.Redis, prefix: str, host: str = "*") -> list[NodeState]:
    """Every node whose heartbeat hash has not expired, ordered by host and pid."""
    keys = sorted(client.scan_iter(match=heartbeat_key_pattern(prefix, host), count=500))
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
    raw = client.get(desired_processes_key(prefix))
    return int(raw) if raw is not None else None


@dataclass(frozen=True)
class ScalingOverride:
    """A desired process count in effect: how many, who set it and when, and for a lease how
    long it has left (None: until `ops scale --reset`)."""

    processes: int
    set_by: str
    set_at: float
    expires_in_seconds: float | None

    def describe(self, now: float | None = None) -> str:
        age = max(0.0, (now or time.time()) - self.set_at) if self.set_at else None
        when = f" {age:.0f} s ago" if age is not None else ""
        if self.expires_in_seconds is not None:
            until = f"lease ends in {self.expires_in_seconds:.0f} s unless the autoscaler renews it"
        else:
            until = "stays until `python -m ops scale --reset`"
        return f"{self.processes} processes per node, set by {self.set_by}{when}; {until}"


def scaling_override(client: redis.Redis, prefix: str) -> ScalingOverride | None:
    """The desired count with its source, or None when nodes run their start-up counts."""
    pipe = client.pipeline(transaction=True)
    pipe.get(desired_processes_key(prefix))
    pipe.pttl(desired_processes_key(prefix))
    pipe.hgetall(scaling_source_key(prefix))
    raw, ttl_ms, fields = pipe.execute()
    if raw is None:
        return None
    try:
        processes = int(raw)
    except ValueError:
        return None
    source = ScalingSource.from_hash(fields) or ScalingSource("operator", 0.0)
    expires = ttl_ms / 1000 if ttl_ms is not None and ttl_ms >= 0 else None
    return ScalingOverride(processes, source.set_by, source.set_at, expires)
