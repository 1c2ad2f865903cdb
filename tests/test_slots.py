"""Shared-memory arenas: a dead node's arena is swept even when its pid comes back (a restarted
container's worker is PID 1 again), and a live node's arena never is."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.slots import LOCK_SUFFIX, SHM_DIR, SlotArena, sweep_stale_segments
from tests.support import ROOT

# A node in a fresh PID namespace, as in a container: it is PID 1. It makes an arena, says its
# name, and waits for its stdin to close, then ends with os._exit: no clean-up runs, as after
# SIGKILL. (The resource tracker is told to forget the segment: in a killed container it dies
# with the node and cleans nothing either.)
_NODE_IN_NAMESPACE = """
import os, sys
from multiprocessing import resource_tracker
from engine.slots import SlotArena
arena = SlotArena(2, 4096)
resource_tracker.unregister("/" + arena.name, "shared_memory")
print(os.getpid(), arena.name, flush=True)
sys.stdin.read()
os._exit(0)
"""
_SWEEP_IN_NAMESPACE = """
import os
from engine.slots import sweep_stale_segments
print(os.getpid(), ",".join(sweep_stale_segments()), flush=True)
"""


def in_pid_namespace(code: str) -> list[str]:
    return ["unshare", "--pid", "--fork", "--map-root-user", sys.executable, "-c", code]


def pid_namespaces_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        in_pid_namespace("import os; print(os.getpid())"), capture_output=True, text=True
    )
    return probe.returncode == 0 and probe.stdout.strip() == "1"


def sweep_as_pid_1() -> tuple[str, list[str]]:
    done = subprocess.run(
        in_pid_namespace(_SWEEP_IN_NAMESPACE),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pid, _, removed = done.stdout.strip().partition(" ")
    return pid, [name for name in removed.split(",") if name]


@pytest.fixture
def arena_names() -> Iterator[list[str]]:
    """Names of arenas a test leaves on /dev/shm on purpose; whatever is left is removed."""
    names: list[str] = []
    yield names
    for name in names:
        for path in (SHM_DIR / name, SHM_DIR / f"{name}{LOCK_SUFFIX}"):
            path.unlink(missing_ok=True)


def test_dead_arena_named_after_the_sweepers_own_pid_is_swept(arena_names: list[str]) -> None:
    # What a hard-killed PID 1 leaves for the next PID 1: its segment and its lock file, which
    # no process holds any more.
    name = f"pixelmill-{os.getpid()}-{secrets.token_hex(8)}"
    arena_names.append(name)
    (SHM_DIR / name).write_bytes(b"\0" * 8192)
    (SHM_DIR / f"{name}{LOCK_SUFFIX}").touch()
    removed = sweep_stale_segments()
    assert name in removed
    assert not (SHM_DIR / name).exists()
    assert not (SHM_DIR / f"{name}{LOCK_SUFFIX}").exists()


def test_segment_of_the_old_pid_only_naming_is_swept_when_the_pid_is_ours(
    arena_names: list[str],
) -> None:
    # Left on a memory volume by a version without lock files: this process did not make it.
    name = f"pixelmill-{os.getpid()}-{secrets.token_hex(4)}"
    arena_names.append(name)
    (SHM_DIR / name).write_bytes(b"\0" * 4096)
    assert name in sweep_stale_segments()
    assert not (SHM_DIR / name).exists()


def test_live_arena_is_never_swept_and_stays_usable() -> None:
    arena = SlotArena(2, 4096)
    try:
        slot = arena.acquire(timeout=1)
        arena.view(slot)[:5] = b"hello"
        removed = sweep_stale_segments()
        assert arena.name not in removed
        assert (SHM_DIR / arena.name).exists()
        assert (SHM_DIR / f"{arena.name}{LOCK_SUFFIX}").exists()
        assert bytes(arena.view(slot)[:5]) == b"hello"
    finally:
        arena.close()
    assert not (SHM_DIR / arena.name).exists()
    assert not (SHM_DIR / f"{arena.name}{LOCK_SUFFIX}").exists(), "close must remove the lock"


@pytest.mark.skipif(not pid_namespaces_available(), reason="needs unshare with PID namespaces")
def test_a_restarted_pid_1_sweeps_its_predecessors_arena_but_not_a_live_pid_1s(
    arena_names: list[str],
) -> None:
    node = subprocess.Popen(
        in_pid_namespace(_NODE_IN_NAMESPACE),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert node.stdout is not None and node.stdin is not None
        node_pid, name = node.stdout.readline().split()
        arena_names.append(name)
        assert node_pid == "1"
        # Another container's PID 1 starting beside a live node must leave its arena alone.
        sweeper_pid, removed = sweep_as_pid_1()
        assert sweeper_pid == "1"
        assert name not in removed
        assert (SHM_DIR / name).exists()
        node.stdin.close()
        assert node.wait(timeout=30) == 0
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    assert (SHM_DIR / name).exists(), "the hard exit must leave the arena behind"
    # The replacement is PID 1 too, and must see that the arena's owner is gone.
    _, removed = sweep_as_pid_1()
    assert name in removed
    assert not Path(SHM_DIR / name).exists()
    assert not (SHM_DIR / f"{name}{LOCK_SUFFIX}").exists()
