"""Shared-memory slots: fixed-size buffers the I/O threads fill and the CPU processes read.

One `multiprocessing.shared_memory` segment per arena, cut into equal slots, so image bytes cross
the process boundary without pickling. The arena's size is the node's memory budget for images.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
from multiprocessing import shared_memory
from pathlib import Path

SEGMENT_PREFIX = "pixelmill"
_SEGMENT_NAME = re.compile(rf"^{SEGMENT_PREFIX}-(\d+)-[0-9a-f]+$")
SHM_DIR = Path("/dev/shm")


class SlotArena:
    """`count` slots of `slot_bytes` each in one shared segment, handed out one at a time."""

    def __init__(self, count: int, slot_bytes: int) -> None:
        if count < 1:
            raise ValueError("an arena needs at least one slot")
        self.count = count
        self.slot_bytes = slot_bytes
        name = f"{SEGMENT_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"
        self._segment = shared_memory.SharedMemory(name=name, create=True, size=count * slot_bytes)
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
        """Unmap and remove the segment; safe to call twice."""
        with contextlib.suppress(FileNotFoundError):
            self._segment.close()
            self._segment.unlink()


def attach_segment(name: str) -> shared_memory.SharedMemory:
    """Open an arena created by the node, from one of its CPU processes.

    The processes share the node's resource tracker, so attaching registers nothing new, and
    the node alone unlinks the segment.
    """
    return shared_memory.SharedMemory(name=name)


def sweep_stale_segments(shm_dir: Path = SHM_DIR) -> list[str]:
    """Remove arenas left behind by nodes that died without cleaning up (e.g. SIGKILL)."""
    removed: list[str] = []
    if not shm_dir.is_dir():
        return removed
    for path in shm_dir.iterdir():
        match = _SEGMENT_NAME.match(path.name)
        if match and not _process_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
