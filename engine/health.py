"""What the node knows about its own progress, and the health record it writes from it.

`WorkProgress` is told when batches begin and end and when a render finishes; the control loop
calls `HealthReporter.write()` every tick, which turns that into the local record
(`common.node_health`) that the liveness probe reads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common.node_health import HealthRecord, write_health_record

log = logging.getLogger(__name__)


def never_paused() -> str | None:
    return None


class WorkProgress:
    """How many images the node holds, and when it last moved one of them on; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._holding = 0
        self._progress_at = clock()

    def took(self, images: int) -> None:
        """A batch of `images` begins. Work taken while idle starts the no-progress clock."""
        with self._lock:
            if self._holding == 0:
                self._progress_at = self._clock()
            self._holding += images

    def released(self, images: int) -> None:
        """A batch ended (committed, requeued or failed): the node no longer holds it."""
        with self._lock:
            self._holding = max(0, self._holding - images)
            self._progress_at = self._clock()

    def progressed(self) -> None:
        """A render finished (whatever its result)."""
        with self._lock:
            self._progress_at = self._clock()

    def snapshot(self) -> tuple[int, float]:
        """(images held, epoch seconds of the last progress)."""
        with self._lock:
            return self._holding, self._progress_at


class HealthReporter:
    """Writes the node's health record; `paused` says why the node waits on purpose, if it
    does (None: it does not)."""

    def __init__(
        self,
        path: Path,
        progress: WorkProgress,
        max_render_seconds: float,
        paused: Callable[[], str | None] = never_paused,
    ) -> None:
        self.path = path
        self._progress = progress
        self._max_render_seconds = max_render_seconds
        self._paused = paused
        self._pid = os.getpid()

    def write(self) -> None:
        holding, progress_at = self._progress.snapshot()
        record = HealthRecord(
            pid=self._pid,
            written_at=time.time(),
            holding=holding,
            progress_at=progress_at,
            max_render_seconds=self._max_render_seconds,
            paused=self._paused(),
        )
        write_health_record(self.path, record)

    def remove(self) -> None:
        """At a clean stop: no record is left to judge a node that is gone."""
        self.path.unlink(missing_ok=True)
