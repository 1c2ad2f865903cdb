"""The node's control loop: local health record, heartbeat for operators, desired process count,
queue-depth gauge.

Operators set `{prefix}engine:processes` (`python -m ops scale`, or the autoscaler's lease);
every node reads it every two seconds and resizes its CPU pool, never beyond its own
WORKER_MAX_PROCESSES (whoever can write Redis must not be able to make a node fork thousands of
processes), and goes back to the count it started with once the key is gone (reset by an
operator, or the autoscaler's lease lapsed). Each node publishes a heartbeat hash that
`python -m ops status` reads; it expires on its own when the node dies. Keys and fields:
`common.node_control`. The health record the liveness probe reads is written first on every
tick, to local disk, so that Redis being away never makes a working node look dead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from common.broker import BROKER_ERRORS, lane_depths
from common.config import QueueSettings
from common.cpu_limit import usable_cores
from common.node_control import (
    CONTROL_INTERVAL_SECONDS,
    HEARTBEAT_TTL_SECONDS,
    Heartbeat,
    desired_processes_key,
    heartbeat_key,
)
from engine import metrics
from engine.health import HealthReporter

log = logging.getLogger(__name__)

QUEUE_DEPTH_EVERY = 5  # control ticks


@dataclass
class NodeCounters:
    processes: int
    completed: int = 0
    failed: int = 0
    batches: int = 0
    # The dependency this node waits for, and since when (epoch seconds); "" while none.
    paused_dependency: str = ""
    paused_since: float = 0.0


class NodeControl:
    """A daemon thread: health record, heartbeat, scaling commands and the queue-depth gauge."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        queue: QueueSettings,
        counters: Callable[[], NodeCounters],
        resize: Callable[[int], None],
        *,
        max_processes: int,
        start_processes: int | None = None,
        health: HealthReporter | None = None,
    ) -> None:
        self._client = client
        self._health = health
        self._max_processes = max_processes
        self._prefix = prefix
        self._queue = queue
        self._counters = counters
        self._resize = resize
        # The count to return to when no desired count is set (None: keep whatever runs).
        self._start_processes = start_processes
        self._cores = usable_cores()
        self._started_at = int(time.time())
        self._key = heartbeat_key(prefix, socket.gethostname(), os.getpid())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="node-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            self._client.delete(self._key)

    def tick(self, tick_number: int = 0) -> None:
        self._apply_desired_processes()
        self._beat()
        if tick_number % QUEUE_DEPTH_EVERY == 0:
            self._measure_queue()

    def _loop(self) -> None:
        tick = 0
        while not self._stop.wait(CONTROL_INTERVAL_SECONDS if tick else 0):
            self._write_health()
            try:
                self.tick(tick)
            except redis.RedisError as exc:
                log.warning("control loop: Redis unavailable (%s)", exc)
            except Exception:
                log.exception("control loop failed")
            tick += 1

    def _write_health(self) -> None:
        if self._health is None:
            return
        try:
            self._health.write()
        except OSError as exc:
            log.warning(
                "control loop: cannot write the health record %s (%s)", self._health.path, exc
            )

    def _apply_desired_processes(self) -> None:
        raw = self._client.get(desired_processes_key(self._prefix))
        if raw is None:
            desired = self._start_processes
            if desired is None:
                return
        else:
            try:
                desired = int(raw)
            except ValueError:
                log.warning("ignoring a desired process count that is not a number: %r", raw)
                return
        capped = min(desired, self._max_processes)
        current = self._counters().processes
        if capped >= 1 and capped != current:
            if capped < desired:
                log.warning("%d processes asked, WORKER_MAX_PROCESSES allows %d", desired, capped)
            why = "the desired count" if raw is not None else "no desired count: the start-up count"
            log.info("scaling CPU processes %d -> %d (%s)", current, capped, why)
            self._resize(capped)
            metrics.PROCESSES.set(capped)

    def _beat(self) -> None:
        counters = self._counters()
        pipe = self._client.pipeline(transaction=True)
        beat = Heartbeat(
            processes=counters.processes,
            completed=counters.completed,
            failed=counters.failed,
            batches=counters.batches,
            started_at=self._started_at,
            heartbeat=int(time.time()),
            queue=self._queue.queue,
            cores=self._cores,
            start_processes=self._start_processes or 0,
            paused_dependency=counters.paused_dependency,
            paused_since=counters.paused_since,
        )
        # Built in place: redis's stubs accept no dict whose key type is narrower than theirs.
        pipe.hset(self._key, mapping={name: value for name, value in beat.to_hash().items()})
        pipe.expire(self._key, HEARTBEAT_TTL_SECONDS)
        pipe.execute()

    def _measure_queue(self) -> None:
        with contextlib.suppress(*BROKER_ERRORS):
            metrics.set_queue_depths(lane_depths(self._queue))
