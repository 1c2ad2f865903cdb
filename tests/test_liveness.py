"""The worker's liveness probe (`python -m ops node-check`) judges the work, not Redis: it fails
a node that holds images without progress, or whose control loop stopped, and passes an idle,
a paused, or a busy node, and one whose Redis is away."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import Settings
from common.node_health import HealthRecord, read_health_record, write_health_record
from engine.health import HealthReporter, WorkProgress
from tests.faults import PrivateRedis
from tests.support import ROOT, PendingJobs, StackProbe, jpeg, start_worker, stop_worker, wait_for

NOW = 1_000_000.0


def record(**fields: object) -> HealthRecord:
    values: dict[str, object] = {
        "pid": 1,
        "written_at": NOW - 1,
        "holding": 0,
        "progress_at": NOW - 3600,
        "max_render_seconds": 30.0,
    }
    values.update(fields)
    return HealthRecord(**values)  # type: ignore[arg-type]


# --- the judgement, on records -------------------------------------------------------------------


def test_an_idle_node_is_alive_however_long_ago_it_last_worked() -> None:
    assert record(holding=0).problem(NOW) is None


def test_a_node_holding_work_without_progress_past_a_render_and_the_margin_is_stuck() -> None:
    assert record(holding=3, progress_at=NOW - 59).problem(NOW, margin_seconds=30) is None
    problem = record(holding=3, progress_at=NOW - 61).problem(NOW, margin_seconds=30)
    assert problem is not None and "holds 3 images" in problem and "no progress" in problem


def test_a_paused_node_holding_work_is_alive() -> None:
    paused = record(holding=3, progress_at=NOW - 3600, paused="the object store is down")
    assert paused.problem(NOW) is None


def test_a_record_the_control_loop_stopped_writing_fails_even_when_idle_or_paused() -> None:
    problem = record(written_at=NOW - 31, paused="waiting").problem(NOW, stale_after_seconds=30)
    assert problem is not None and "control loop" in problem


def test_taking_work_after_an_idle_hour_starts_the_no_progress_clock_afresh() -> None:
    now = [NOW]
    progress = WorkProgress(clock=lambda: now[0])
    now[0] += 3600
    progress.took(4)
    assert progress.snapshot() == (4, NOW + 3600)
    now[0] += 5
    progress.took(2)  # a second batch while the first is held: the clock keeps running
    assert progress.snapshot() == (6, NOW + 3600)
    progress.progressed()
    progress.released(4)
    assert progress.snapshot() == (2, NOW + 3605)


def test_the_reporter_writes_what_the_node_holds_and_why_it_is_paused(tmp_path: Path) -> None:
    progress = WorkProgress()
    progress.took(3)
    path = tmp_path / "health" / "record.json"
    HealthReporter(path, progress, 7.0, paused=lambda: "the database is down").write()
    written = read_health_record(path)
    assert (written.holding, written.max_render_seconds) == (3, 7.0)
    assert written.paused == "the database is down"


# --- the command ---------------------------------------------------------------------------------


def node_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops", "node-check", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_node_check_fails_without_a_record_and_on_a_stuck_one(
    env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "health.json"
    check_env = {**env, "WORKER_HEALTH_FILE": str(path)}
    missing = node_check(check_env)
    assert missing.returncode == 1 and "no health record" in missing.stderr

    write_health_record(path, record(written_at=time.time(), holding=2, progress_at=0.0))
    stuck = node_check(check_env)
    assert stuck.returncode == 1 and "stuck" in stuck.stderr

    write_health_record(path, record(written_at=time.time(), holding=2, progress_at=time.time()))
    assert node_check(check_env).returncode == 0


# --- real nodes ----------------------------------------------------------------------------------


def node_env(env: dict[str, str], settings: Settings, health: Path, **extra: str) -> dict[str, str]:
    return {
        **env,
        "RABBITMQ_QUEUE": settings.queue.queue,
        "RABBITMQ_DEAD_LETTER_QUEUE": settings.queue.dead_letter_queue,
        "REDIS_URL": settings.redis_url,
        "REDIS_PREFIX": settings.redis_prefix,
        "WORKER_HEALTH_FILE": str(health),
        **extra,
    }


@pytest.fixture
def jobs(private_queue: Settings, user_id: str) -> Iterator[PendingJobs]:
    made = PendingJobs(private_queue, user_id)
    yield made
    made.close()


def passes(env: dict[str, str]) -> bool:
    return node_check(env).returncode == 0


@pytest.mark.slow
def test_a_node_stuck_on_its_work_fails_node_check(
    env: dict[str, str], private_queue: Settings, jobs: PendingJobs, tmp_path: Path
) -> None:
    # The node holds every batch (a test hook) far longer than a render may take.
    worker_env = node_env(
        env,
        private_queue,
        tmp_path / "health.json",
        WORKER_TEST_HOLD_BATCH_SECONDS="3600",
        MAX_RENDER_SECONDS="1",
    )
    node = start_worker(worker_env, tmp_path / "worker.log")
    try:
        wait_for(lambda: passes(worker_env), timeout=90, what="node-check to pass on an idle node")
        jobs.publish([jobs.pending(jpeg(64, 48))])
        failed = wait_for(
            lambda: (r := node_check(worker_env, "--margin", "1")).returncode == 1 and r,
            timeout=60,
            what="node-check to fail on the stuck node",
        )
        assert "holds 1 images and made no progress" in failed.stderr
        assert node.poll() is None  # alive, and stuck: what only the probe can see
    finally:
        stop_worker(node, timeout=5)


@pytest.mark.slow
def test_node_check_passes_while_redis_is_stopped_for_90_seconds_and_work_goes_on(
    env: dict[str, str], private_queue: Settings, probe: StackProbe, tmp_path: Path, user_id: str
) -> None:
    redis_server = PrivateRedis(tmp_path / "redis.log")
    redis_server.start()
    own = dataclasses.replace(private_queue, redis_url=redis_server.url)
    worker_env = node_env(env, own, tmp_path / "health.json")
    node = start_worker(worker_env, tmp_path / "worker.log")
    jobs = PendingJobs(own, user_id)
    try:
        wait_for(lambda: passes(worker_env), timeout=90, what="node-check to pass")
        redis_server.kill()
        stopped_at = time.monotonic()
        image = jobs.pending(jpeg(900, 600))
        jobs.publish([image])
        checks = 0
        while time.monotonic() - stopped_at < 90:
            result = node_check(worker_env)
            assert result.returncode == 0, result.stderr
            checks += 1
            time.sleep(5)
        assert checks >= 5 and node.poll() is None
        assert probe.status(image) == "completed"  # the node kept working without its cache
    finally:
        jobs.close()
        stop_worker(node)
        redis_server.kill()
