"""Telling a dependency outage from one image's failure, and holding the work through the outage.

When a stage fails with `DependencyUnavailable`, the batch asks the `DependencyGate` whether the
dependency itself answers a cheap probe (S3: a bucket request; PostgreSQL: `SELECT 1`). If it
does, the failure belongs to the image and counts against its delivery limit as before. If it
does not, the node is paused: the stage's thread waits (its messages stay unacknowledged, so no
delivery is used) while one thread probes with exponential backoff and full jitter, and every
waiting stage is retried once the probe answers. The consumer starts no batch while paused.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from common.errors import DependencyUnavailable
from engine import metrics

log = logging.getLogger(__name__)

FIRST_PROBE_SECONDS = 0.5
# Short enough that a node resumes within this long of the dependency's return; the jitter
# spreads many nodes' returns over the same span.
MAX_PROBE_SECONDS = 15.0


@dataclass(frozen=True)
class Pause:
    """Why a node is paused: the dependency that does not answer, since when (epoch seconds)."""

    dependency: str
    since: float


class GateStopped(DependencyUnavailable):
    """The node is stopping while a dependency is down: the held work goes back to the queue,
    as for any `DependencyUnavailable`."""


def probe_delay(failures: int, first: float, cap: float, draw: Callable[[], float]) -> float:
    """Seconds before the next probe after `failures` failed ones: exponential, capped, and
    drawn between half and all of it, so that nodes paused together do not return together."""
    ceiling = min(cap, first * 2 ** max(0, failures - 1))
    return ceiling / 2 + draw() * ceiling / 2


class DependencyGate:
    """Knows which dependency is down, and holds the callers that need it until it answers."""

    def __init__(
        self,
        probes: Mapping[str, Callable[[], None]],
        *,
        first_probe_seconds: float = FIRST_PROBE_SECONDS,
        max_probe_seconds: float = MAX_PROBE_SECONDS,
        draw: Callable[[], float] = random.random,
    ) -> None:
        """`probes`: for each dependency's name, a call that raises unless it answers."""
        self._probes = dict(probes)
        self._first = first_probe_seconds
        self._cap = max_probe_seconds
        self._draw = draw
        self._lock = threading.Condition()
        self._down: dict[str, float] = {}  # dependency -> since (epoch seconds)
        self._stopped = False
        for name in self._probes:
            metrics.PAUSED.labels(name).set(0)

    def pause(self) -> Pause | None:
        """The oldest outage in progress, or None while every dependency answers."""
        with self._lock:
            if not self._down:
                return None
            name = min(self._down, key=self._down.__getitem__)
            return Pause(name, self._down[name])

    def paused(self) -> bool:
        with self._lock:
            return bool(self._down)

    @property
    def stopping(self) -> bool:
        """True once `stop` was called: held work is being given back, not failing."""
        with self._lock:
            return self._stopped

    def stop(self) -> None:
        """Release every held caller with `GateStopped` (the node is shutting down)."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()

    def hold_if_down(self, dependency: str) -> bool:
        """After a `DependencyUnavailable` from `dependency`: False when it answers its probe
        (the failure was the caller's own); otherwise wait until it answers again and return
        True (retry the stage). Raises `GateStopped` if the node stops meanwhile."""
        with self._lock:
            if self._stopped:
                raise GateStopped(dependency)
            already_down = dependency in self._down
        if not already_down and self._answers(dependency):
            return False
        with self._lock:
            if dependency in self._down:
                self._wait_until_up(dependency)
                return True
            self._down[dependency] = time.time()
        log.warning("%s unreachable: pausing; held work waits, no attempt is used", dependency)
        metrics.PAUSED.labels(dependency).set(1)
        self._probe_until_up(dependency)
        return True

    def _wait_until_up(self, dependency: str) -> None:
        while dependency in self._down and not self._stopped:
            self._lock.wait()
        if self._stopped:
            raise GateStopped(dependency)

    def _probe_until_up(self, dependency: str) -> None:
        failures = 1
        try:
            while True:
                with self._lock:
                    delay = probe_delay(failures, self._first, self._cap, self._draw)
                    self._lock.wait_for(lambda: self._stopped, timeout=delay)
                    if self._stopped:
                        raise GateStopped(dependency)
                if self._answers(dependency):
                    break
                failures += 1
        finally:
            with self._lock:
                since = self._down.pop(dependency)
                self._lock.notify_all()
            metrics.PAUSED.labels(dependency).set(0)
        log.info("%s answers again after %.0f s: resuming", dependency, time.time() - since)

    def _answers(self, dependency: str) -> bool:
        """Whether `dependency` answers its probe; one without a probe is taken to answer, so
        its failures stay the caller's own."""
        probe = self._probes.get(dependency)
        if probe is None:
            return True
        try:
            probe()
        except DependencyUnavailable:
            return False
        return True
