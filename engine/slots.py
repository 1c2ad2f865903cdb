"""Shared-memory slots: fixed-size buffers the I/O threads fill and the CPU processes read.

One `multiprocessing.shared_memory` segment per arena, cut into equal slots, so image bytes cross
the process boundary without pickling. The arena's size is the node's memory budget for images.

`/dev/shm` can outlive the process (a Kubernetes memory volume survives container restarts), so
each arena proves it is alive with an flock on a lock file beside its segment, held for the
arena's life. The kernel drops the lock when the owner dies, however it dies, and a process that
later gets the same pid cannot hold it: the pid in a segment's name is only a hint for people.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import threading
from multiprocessing import shared_memory
from pathlib import Path

SEGMENT_PREFIX = "pixelmill"
_SEGMENT_NAME = re.compile(rf"^{SEGMENT_PREFIX}-(\d+)-[0-9a-f]+$")
LOCK_SUFFIX = ".lock"
SHM_DIR = Path("/dev/shm")


class SlotArena:
    """`count` slots of `slot_bytes` each in one shared segment, handed out one at a time."""

    def __init__(self, count: int, slot_bytes: int) -> None:
        if count < 1:
            raise ValueError("an arena needs at least one slot")
        self.count = count
        self.slot_bytes = slot_bytes
        name = f"{SEGMENT_PREFIX}-{os.getpid()}-{secrets.token_hex(8)}"
        # The lock exists, held, before the segment does: a sweep never sees an unowned arena.
        self._lock_path = SHM_DIR / f"{name}{LOCK_SUFFIX}"
        self._lock_fd: int | None = hold_owner_lock(self._lock_path)
        try:
            self._segment = shared_memory.SharedMemory(
                name=name, create=True, size=count * slot_bytes
            )
        except BaseException:
            self._drop_lock()
            raise
        self._free = list(range(count))
        self._available = threading.Condition()

    @property
    def name(self) -> str:
        return self._segment.name

    @property
    def in_use(self) -> int:
        with self._available:
            return self.count - len(self._free)

    def acquire(self, timeout: float | None = None) -> int:
        """A free slot's index; blocks while all are in use (this is the memory bound)."""
        with self._available:
            if not self._available.wait_for(lambda: self._free, timeout=timeout):
                raise TimeoutError("no free shared-memory slot")
            return self._free.pop()

    def release(self, index: int) -> None:
        with self._available:
            self._free.append(index)
            self._available.notify()

    def view(self, index: int) -> memoryview:
        start = index * self.slot_bytes
        buf = self._segment.buf
        assert buf is not None
        return buf[start : start + self.slot_bytes]

    def close(self) -> None:
        """Unmap and remove the segment, then its lock; safe to call twice."""
        with contextlib.suppress(FileNotFoundError):
            self._segment.close()
            self._segment.unlink()
        self._drop_lock()

    def _drop_lock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self._lock_path.unlink()
        os.close(self._lock_fd)
        self._lock_fd = None


def hold_owner_lock(path: Path) -> int:
    """Create `path` already locked by this process and return the descriptor that holds it.

    The file is made and locked under a name no sweep looks at, then renamed into place, so no
    sweep can find it unlocked (and take it for a dead owner's) in between.
    """
    claim = path.with_name(f".claim-{secrets.token_hex(8)}")
    fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(claim, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            claim.unlink()
        raise
    return fd


def attach_segment(name: str) -> shared_memory.SharedMemory:
    """Open an arena created by the node, from one of its CPU processes.

    The processes share the node's resource tracker, so attaching registers nothing new, and
    the node alone unlinks the segment.
    """
    return shared_memory.SharedMemory(name=name)


def sweep_stale_segments(shm_dir: Path = SHM_DIR) -> list[str]:
    """Remove arenas left behind by nodes that died without cleaning up (e.g. SIGKILL).

    An arena whose lock file no one holds is dead. A segment without a lock file comes from a
    version that named ownership by pid alone: it is dead when that pid is gone or is this
    process's own (a restarted container's PID 1 did not create it).
    """
    removed: list[str] = []
    if not shm_dir.is_dir():
        return removed
    arenas = {path.name.removesuffix(LOCK_SUFFIX) for path in shm_dir.iterdir()}
    for name in sorted(arenas):
        match = _SEGMENT_NAME.match(name)
        if match is None:
            continue
        segment = shm_dir / name
        lock_path = shm_dir / f"{name}{LOCK_SUFFIX}"
        if lock_path.exists():
            if _remove_if_unowned(segment, lock_path):
                removed.append(name)
        elif not _legacy_owner_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()
                removed.append(name)
    return removed


def _remove_if_unowned(segment: Path, lock_path: Path) -> bool:
    """Take the owner's lock if it is free (the owner is dead) and remove the arena under it."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return False  # its owner just closed it, or another sweep removed it
    except PermissionError:
        return False  # another user's arena: not ours to judge
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        with contextlib.suppress(FileNotFoundError):
            segment.unlink()
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        return True
    finally:
        os.close(fd)


def _legacy_owner_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
