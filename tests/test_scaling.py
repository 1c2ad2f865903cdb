"""Scaling that knows the machine and leaves nothing stale: nodes size by the cores they may use,
the autoscaler never asks for more and holds a lease that ends with it, an operator's count stays
until `ops scale --reset`, and a node without a desired count returns to its start-up count."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

import pika
import pytest
import redis

from common.broker import declare_topology
from common.config import Settings
from common.cpu_limit import cgroup_cpu_quota, usable_cores
from common.jobs import JobMessage
from common.node_control import Heartbeat, desired_processes_key, heartbeat_key, scaling_source_key
from engine.control import NodeControl, NodeCounters
from ops.pipeline_state import scaling_override
from ops.scale import Autoscaler, Bounds, Sample, plan, scale_command
from ops.status import status_command
from tests.support import wait_for

AFFINITY = usable_cores(Path("/nonexistent"))

# --- cores from the cgroup ----------------------------------------------------------------------


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return tmp_path


def test_a_cgroup_v2_quota_limits_the_usable_cores(tmp_path: Path) -> None:
    root = _cgroup(tmp_path, {"cpu.max": "150000 100000"})

    assert cgroup_cpu_quota(root) == 1.5
    assert usable_cores(root) == min(AFFINITY, 2)


def test_a_half_core_quota_still_allows_one_process(tmp_path: Path) -> None:
    assert usable_cores(_cgroup(tmp_path, {"cpu.max": "50000 100000"})) == 1


def test_no_quota_leaves_the_affinity_mask(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(_cgroup(tmp_path, {"cpu.max": "max 100000"})) is None
    assert usable_cores(tmp_path) == AFFINITY


def test_a_cgroup_v1_quota_is_read_too(tmp_path: Path) -> None:
    root = _cgroup(tmp_path, {"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"})
    assert usable_cores(root) == 1
    unlimited = _cgroup(
        tmp_path / "u", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "1"}
    )
    assert cgroup_cpu_quota(unlimited) is None


# --- the autoscaler's plan ----------------------------------------------------------------------

BOUNDS = Bounds(minimum=1, maximum=8, target_per_process=50, drain_target_seconds=60)


def test_plan_never_asks_a_node_for_more_processes_than_its_cores() -> None:
    deep = Sample(depth=7700, nodes=1, total_processes=2, current=2, node_cores=2, drain_rate=30)

    decision = plan(deep, [7700, 7700], BOUNDS)

    assert decision.processes == 2
    assert "cap of 2" in decision.reason and "more nodes" in decision.reason


def test_plan_brings_a_count_above_the_cores_down() -> None:
    over = Sample(depth=7700, nodes=1, total_processes=4, current=4, node_cores=2, drain_rate=30)

    assert plan(over, [], BOUNDS).processes == 2


def test_plan_holds_a_deep_backlog_that_drains_within_the_target_anyway() -> None:
    fast = Sample(depth=600, nodes=1, total_processes=2, current=2, node_cores=8, drain_rate=20)

    decision = plan(fast, [600, 600], BOUNDS)

    assert decision.processes == 2
    assert "drains in 30 s" in decision.reason


def test_plan_adds_a_process_when_the_backlog_drains_too_slowly() -> None:
    slow = Sample(depth=600, nodes=1, total_processes=2, current=2, node_cores=8, drain_rate=2)

    decision = plan(slow, [600, 600], BOUNDS)

    assert decision.processes == 3
    assert decision.reason.startswith("up:") and "drains in 300 s" in decision.reason


# --- against Redis and RabbitMQ -----------------------------------------------------------------


def _redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, decode_responses=True)


def _heartbeat(settings: Settings, processes: int, cores: int, completed: int = 0) -> None:
    client = _redis(settings)
    key = heartbeat_key(settings.redis_prefix, "node-a", 1)
    now = time.time()
    beat = Heartbeat(processes, completed, 0, 1, now - 60, now, settings.queue.queue, cores, 2)
    client.hset(key, mapping=beat.to_hash())
    client.expire(key, 30)


def _queue_jobs(settings: Settings, count: int) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(settings.queue.url))
    channel = connection.channel()
    declare_topology(channel, settings.queue)
    for _ in range(count):
        channel.basic_publish("", settings.queue.queue, JobMessage(uuid.uuid4()).encode())
    connection.close()


def test_the_autoscalers_count_is_a_lease_that_ends_when_it_stops_renewing(
    private_queue: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    _heartbeat(private_queue, processes=1, cores=4)
    _queue_jobs(private_queue, 300)
    scaler = Autoscaler(private_queue, BOUNDS, lease_seconds=2.0)
    key = desired_processes_key(private_queue.redis_prefix)

    assert [scaler.step(), scaler.step()] == [1, 2]

    client = _redis(private_queue)
    assert client.get(key) == "2"
    assert 0 < client.pttl(key) <= 2000
    status_command(["--json"], private_queue)
    override = json.loads(capsys.readouterr().out)["scaling_override"]
    assert (override["processes"], override["set_by"]) == (2, "autoscaler")
    assert 0 < override["expires_in_seconds"] <= 2
    assert scaler.step() == 2  # a hold renews the lease
    assert client.pttl(key) > 0

    # The autoscaler stops: nothing renews the lease, so the nodes' own counts come back.
    wait_for(lambda: client.get(key) is None, timeout=10)
    assert client.exists(scaling_source_key(private_queue.redis_prefix)) == 0
    assert scaling_override(client, private_queue.redis_prefix) is None


def test_the_autoscaler_stays_within_the_cores_the_nodes_report(private_queue: Settings) -> None:
    _heartbeat(private_queue, processes=2, cores=2)
    _queue_jobs(private_queue, 1000)
    scaler = Autoscaler(private_queue, BOUNDS)

    assert [scaler.step() for _ in range(4)] == [2, 2, 2, 2]
    assert _redis(private_queue).get(desired_processes_key(private_queue.redis_prefix)) is None


def test_an_operators_count_stays_until_reset_and_status_says_who_set_it(
    private_queue: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    client = _redis(private_queue)
    key = desired_processes_key(private_queue.redis_prefix)

    assert scale_command(["--processes", "3"], private_queue) == 0
    assert client.get(key) == "3" and client.pttl(key) == -1
    capsys.readouterr()
    status_command([], private_queue)
    screen = capsys.readouterr().out
    assert "override in effect: 3 processes per node, set by operator" in screen
    assert "until `python -m ops scale --reset`" in screen

    assert scale_command(["--reset"], private_queue) == 0

    assert client.get(key) is None
    assert client.exists(scaling_source_key(private_queue.redis_prefix)) == 0
    assert "nodes use their start-up counts" in capsys.readouterr().out
    status_command([], private_queue)
    assert "override in effect" not in capsys.readouterr().out


def test_a_node_returns_to_its_start_up_count_when_no_count_is_set(
    private_queue: Settings,
) -> None:
    running = NodeCounters(processes=2)
    resized: list[int] = []

    def resize(processes: int) -> None:
        resized.append(processes)
        running.processes = processes

    control = NodeControl(
        redis.Redis.from_url(private_queue.redis_url),
        private_queue.redis_prefix,
        private_queue.queue,
        lambda: running,
        resize,
        max_processes=64,
        start_processes=2,
    )
    key = desired_processes_key(private_queue.redis_prefix)
    client = _redis(private_queue)
    try:
        control.tick()
        assert resized == []
        client.set(key, "1")
        control.tick()
        assert resized == [1]
        client.delete(key)
        control.tick()
        assert resized == [1, 2]
        beat = Heartbeat.from_hash(
            client.hgetall(heartbeat_key(private_queue.redis_prefix, *_own_node()))
        )
        assert (beat.cores, beat.start_processes) == (usable_cores(), 2)
    finally:
        control.stop()


def _own_node() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def test_the_processes_flag_cannot_pass_the_configured_ceiling(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from engine.__main__ import parse_args

    ceiling = Settings.from_env({"PIXELMILL_ENV": "local", "WORKER_MAX_PROCESSES": "4"})

    assert parse_args(["--processes", "4"], ceiling).engine.processes == 4
    with pytest.raises(SystemExit) as refused:
        parse_args(["--processes", "8"], ceiling)
    assert refused.value.code == 2
    assert "WORKER_MAX_PROCESSES=4" in capsys.readouterr().err
