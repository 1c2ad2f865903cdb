"""The CPU pool on its own: a render that kills its process or overruns its deadline fails alone,
the pool keeps its size, and renders in flight on other processes are not disturbed."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.cpu_pool import (
    KernelOptions,
    RenderCrashed,
    RenderFailed,
    RenderResult,
    RenderTimedOut,
)
from tests.support import (
    CRASH_MARKER,
    FAIL_MARKER,
    HANG_MARKER,
    PoolUnderTest,
    jpeg,
    paused,
    render_or_misbehave,
    wait_for,
)

MIB = 1024 * 1024


@pytest.fixture
def cpu() -> Iterator[PoolUnderTest]:
    under_test = PoolUnderTest(
        KernelOptions(target_width=800, output_format="png", max_pixels=50_000_000),
        render_or_misbehave,
    )
    yield under_test
    under_test.close()


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def assert_renders_an_800px_grayscale_png(cpu: PoolUnderTest) -> None:
    result, output = cpu.render(jpeg(1600, 1200))
    assert result.error is None
    assert (result.width, result.height, result.content_type) == (800, 600, "image/png")
    decoded = cv2.imdecode(np.frombuffer(output, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (600, 800)


def test_a_render_comes_back_through_the_output_slot(cpu: PoolUnderTest) -> None:
    assert_renders_an_800px_grayscale_png(cpu)


def test_an_unprocessable_image_is_an_error_result_not_an_exception(cpu: PoolUnderTest) -> None:
    result, _ = cpu.render(jpeg(1600, 1200)[:600])
    assert result.error and "decod" in result.error.lower()


def test_a_render_that_kills_its_process_fails_alone_and_the_process_is_replaced(
    cpu: PoolUnderTest, tmp_path: Path
) -> None:
    before = cpu.pool.pids()
    assert len(before) == 2
    # Hold the other process mid-render: it must come through the crash untouched.
    with ThreadPoolExecutor(1) as thread:
        in_flight = thread.submit(cpu.render, paused(jpeg(1600, 1200), tmp_path))
        wait_for(lambda: (tmp_path / "started").exists(), timeout=30)
        with pytest.raises(RenderCrashed):
            cpu.render(CRASH_MARKER + jpeg(800, 600))
        (tmp_path / "release").touch()
        result, _ = in_flight.result(timeout=60)

    assert result.error is None and result.width == 800
    assert (tmp_path / "started").read_text().count("\n") == 1, "rendered once, never retried"
    after = cpu.pool.pids()
    assert len(after) == 2
    dead = set(before) - set(after)
    assert len(dead) == 1 and not alive(dead.pop())
    assert_renders_an_800px_grayscale_png(cpu)


def test_a_render_past_its_deadline_is_timed_out_and_its_process_killed(
    cpu: PoolUnderTest,
) -> None:
    before = set(cpu.pool.pids())
    with pytest.raises(RenderTimedOut):
        cpu.render(HANG_MARKER, timeout=0.5)

    after = set(cpu.pool.pids())
    assert len(after) == 2
    [killed] = before - after
    assert not alive(killed)
    assert_renders_an_800px_grayscale_png(cpu)


def test_without_a_deadline_a_render_is_waited_for(cpu: PoolUnderTest, tmp_path: Path) -> None:
    waited = threading.Event()

    def release_later() -> None:
        wait_for(lambda: (tmp_path / "started").exists(), timeout=30)
        waited.set()
        (tmp_path / "release").touch()

    releaser = threading.Thread(target=release_later)
    releaser.start()
    result, _ = cpu.render(paused(jpeg(900, 600), tmp_path))
    releaser.join()
    assert waited.is_set() and result.error is None and result.width == 800


def test_a_process_killed_while_idle_costs_no_image(cpu: PoolUnderTest) -> None:
    import os
    import signal

    victim = cpu.pool.pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not alive(victim), timeout=10)

    for _ in range(4):  # whichever process each render gets
        assert_renders_an_800px_grayscale_png(cpu)
    assert victim not in cpu.pool.pids() and len(cpu.pool.pids()) == 2


def test_a_bug_in_the_render_function_raises_and_keeps_the_process(cpu: PoolUnderTest) -> None:
    before = cpu.pool.pids()
    with pytest.raises(RenderFailed, match="a bug in the render function"):
        cpu.render(FAIL_MARKER)
    assert cpu.pool.pids() == before
    assert_renders_an_800px_grayscale_png(cpu)


def test_resize_starts_and_stops_processes(cpu: PoolUnderTest) -> None:
    cpu.pool.resize(3)
    assert len(cpu.pool.pids()) == 3
    grown = cpu.pool.pids()
    cpu.pool.resize(1)
    [kept] = cpu.pool.pids()
    assert kept in grown
    wait_for(lambda: sum(alive(p) for p in grown) == 1, timeout=10)
    assert_renders_an_800px_grayscale_png(cpu)


def test_an_urgent_render_takes_the_next_idle_process_before_renders_that_waited_longer(
    tmp_path: Path,
) -> None:
    options = KernelOptions(target_width=800, output_format="png", max_pixels=50_000_000)
    one = PoolUnderTest(options, render_or_misbehave, processes=1, slots=6)
    finished: list[str] = []

    def render(name: str, *, urgent: bool) -> None:
        result, _ = one.render(jpeg(900, 600), urgent=urgent)
        assert result.error is None
        finished.append(name)

    try:
        with ThreadPoolExecutor(5) as threads:
            holding = threads.submit(one.render, paused(jpeg(900, 600), tmp_path))
            wait_for(lambda: (tmp_path / "started").exists(), timeout=30)
            waiting = [threads.submit(render, f"bulk {n}", urgent=False) for n in range(3)]
            wait_for(lambda: one.pool.waiting == 3, timeout=30)
            waiting.append(threads.submit(render, "urgent", urgent=True))
            wait_for(lambda: one.pool.waiting == 4, timeout=30)
            (tmp_path / "release").touch()
            for future in (holding, *waiting):
                future.result(timeout=60)
    finally:
        one.close()

    assert finished[0] == "urgent"
    assert sorted(finished[1:]) == ["bulk 0", "bulk 1", "bulk 2"]


def render_reporting_the_threads_nice(task: object) -> RenderResult:
    """A render function that answers with the nice value of the thread it runs on."""
    return RenderResult(error=str(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))


@pytest.mark.parametrize("bulk_nice", [0, 7])
def test_bulk_renders_run_at_the_lower_priority_and_urgent_ones_at_the_processs_own(
    bulk_nice: int,
) -> None:
    options = KernelOptions(target_width=800, output_format="png", max_pixels=50_000_000)
    one = PoolUnderTest(
        options, render_reporting_the_threads_nice, processes=1, bulk_nice=bulk_nice
    )
    try:
        # Urgent after bulk too: the bulk renders' priority is not the process's.
        niceness = [
            int(one.render(b"-", urgent=urgent)[0].error) for urgent in (True, False, True, False)
        ]
    finally:
        one.close()

    own = os.getpriority(os.PRIO_PROCESS, 0)
    bulk = min(19, own + bulk_nice)
    assert niceness == [own, bulk, own, bulk]
