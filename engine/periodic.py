"""A chore a worker node repeats on a schedule in a daemon thread of its own: the outbox
sweeper, the abandoned-upload sweeper, the dead-letter reaper, the webhook deliverer.

Each round is one call of the chore's `run_once`. A dependency being away is expected: the round
is logged at warning and the next one tries again. Anything else is a bug, logged at error with
its traceback, and the schedule goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from common.errors import DependencyUnavailable

log = logging.getLogger(__name__)


class PeriodicChore:
    """Calls `run_once` every `interval_seconds` (the first call one interval after `start`)
    until `stop`."""

    def __init__(
        self,
        name: str,
        run_once: Callable[[], object],
        interval_seconds: float,
        expected: tuple[type[Exception], ...] = (DependencyUnavailable,),
    ) -> None:
        self.name = name
        self._run_once = run_once
        self._interval = interval_seconds
        self._expected = expected
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._run_once()
            except self._expected as exc:
                log.warning("%s: round skipped: %s", self.name, exc)
            except Exception:
                log.exception("%s: round failed", self.name)
