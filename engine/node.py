"""A worker node: the arenas, the CPU pool, the batch pipeline, the consumer, the sweepers, the
webhook deliverer and its retention chore, started together and stopped together (SIGTERM
drains)."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.context import ForkServerContext
from pathlib import Path
from types import FrameType

from prometheus_client import start_http_server

from common.broker import JobPublisher
from common.cache import ImageCache
from common.config import Settings
from common.storage import ObjectStore
from db.pool import DEPENDENCY as DATABASE
from db.pool import Database
from engine import metrics
from engine.abandoned_uploads import AbandonedUploadSweeper
from engine.batch import BatchProcessor, Delivery, Verdict
from engine.consumer import BatchConsumer
from engine.control import NodeControl, NodeCounters
from engine.cpu_pool import KernelOptions, KernelPool, RenderResult, RenderTask, render_slot
from engine.dead_letters import DeadLetterReaper
from engine.dependencies import DependencyGate
from engine.health import HealthReporter, WorkProgress
from engine.outbox import OutboxSweeper
from engine.retention import RetentionSweeper
from engine.slots import SlotArena, sweep_stale_segments
from engine.webhook_retention import WebhookPruner
from engine.webhooks import WebhookDeliverer

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# A rendered 800 px grayscale image is far below this; larger results travel by pickling.
OUTPUT_SLOT_BYTES = 4 * MIB


def slot_count(memory_mb: int, input_slot_bytes: int) -> int:
    """How many image pairs (original + result) fit the memory budget; at least two."""
    return max(2, (memory_mb * MIB) // (input_slot_bytes + OUTPUT_SLOT_BYTES))


def io_threads(slots: int, processes: int) -> tuple[int, int]:
    """The I/O threads of interactive and of bulk work: as many interactive ones as CPU
    processes (at least two), three bulk ones per process (at least four), within the slot
    pairs, of which each thread holds one at a time (interactive work keeps its share)."""
    urgent = max(1, min(max(2, processes), slots // 2))
    return urgent, max(1, min(slots - urgent, max(4, processes * 3)))


class WorkerNode:
    """Everything one `pixelmill-worker` process runs."""

    def __init__(
        self,
        settings: Settings,
        cpu_context: ForkServerContext | None = None,
        render: Callable[[RenderTask], RenderResult] = render_slot,
    ) -> None:
        """`cpu_context` starts the CPU processes: the fork server the entry point prepared
        (see `engine.__main__`); a plain fork server by default. `render` runs in the CPU
        processes (tests give one that misbehaves on purpose)."""
        self.settings = settings
        engine = settings.engine
        self.progress = WorkProgress()
        removed = sweep_stale_segments()
        if removed:
            log.info("removed %d shared-memory segments left by dead nodes", len(removed))
        input_slot_bytes = settings.api.max_upload_bytes
        count = slot_count(engine.memory_mb, input_slot_bytes)
        self.inputs = SlotArena(count, input_slot_bytes)
        self.outputs = SlotArena(count, OUTPUT_SLOT_BYTES)
        self.pool = KernelPool(
            engine.processes,
            (self.inputs.name, self.inputs.slot_bytes),
            (self.outputs.name, self.outputs.slot_bytes),
            KernelOptions(
                engine.target_width,
                engine.output_format,
                engine.max_pixels,
                engine.max_decode_bytes,
                engine.renditions,
            ),
            render=render,
            context=cpu_context or multiprocessing.get_context("forkserver"),
            after_render=self.progress.progressed,
            bulk_nice=engine.bulk_render_nice if settings.queue.lanes else 0,
        )
        self.db = Database(settings.postgres_url, max_size=4)
        self.store = ObjectStore(settings.storage)
        cache = ImageCache.from_url(settings.redis_url, settings.redis_prefix)
        # What the batches need: while one does not answer, the node holds its work (no
        # delivery is used) and starts no batch. Redis is not here: without it, work goes on.
        self.gate = DependencyGate(
            {self.store.dependency: self.store.check, DATABASE: self.db.check}
        )
        urgent_threads, bulk_threads = io_threads(count, engine.processes)
        self.processor = BatchProcessor(
            self.db,
            self.store,
            cache,
            self.pool,
            self.inputs,
            self.outputs,
            io_threads=bulk_threads,
            urgent_io_threads=urgent_threads,
            lanes=settings.queue.lanes,
            delivery_limit=settings.queue.delivery_limit,
            render_timeout=engine.max_render_seconds,
            gate=self.gate,
        )
        self.consumer = BatchConsumer(
            settings.queue, engine, self._process_batch, paused=self.gate.paused
        )
        self.sweeper = OutboxSweeper(self.db, JobPublisher(settings.queue))
        self.reaper = DeadLetterReaper(
            self.db,
            cache,
            settings.queue,
            grace_seconds=settings.queue.dead_letter_grace_seconds,
            interval_seconds=min(30.0, max(1.0, settings.queue.dead_letter_grace_seconds)),
        )
        self.upload_sweeper = AbandonedUploadSweeper(
            self.db,
            self.store,
            interval_seconds=engine.abandoned_upload_sweep_seconds,
            age_seconds=engine.abandoned_upload_age_seconds,
        )
        self.retention = RetentionSweeper(self.db, self.store, cache, settings.retention)
        self.health = HealthReporter(
            Path(engine.health_file),
            self.progress,
            engine.max_render_seconds,
            paused=self._paused_reason,
        )
        self.webhooks = WebhookDeliverer(self.db, settings.webhooks)
        self.webhook_pruner = WebhookPruner(self.db, settings.webhooks.retention_hours)
        self.control = NodeControl(
            cache.client,
            settings.redis_prefix,
            settings.queue,
            self._counters,
            self.pool.resize,
            max_processes=engine.max_processes,
            start_processes=engine.processes,
            health=self.health,
        )
        if engine.test_hold_batch_seconds:
            log.warning(
                "test hook: every batch is held for %.1f s (WORKER_TEST_HOLD_BATCH_SECONDS)",
                engine.test_hold_batch_seconds,
            )
        metrics.PROCESSES.set(engine.processes)
        metrics.SLOTS_IN_USE.set_function(lambda: self.inputs.in_use)
        log.info(
            "worker node: processes=%d prefetch=%d batch_size=%d batch_wait_ms=%d "
            "memory_mb=%d (%d slots) output=%s target_width=%d",
            engine.processes,
            engine.prefetch,
            engine.batch_size,
            engine.batch_wait_ms,
            engine.memory_mb,
            count,
            engine.output_format,
            engine.target_width,
        )

    def _process_batch(self, deliveries: list[Delivery]) -> Verdict:
        self.progress.took(len(deliveries))
        try:
            if self.settings.engine.test_hold_batch_seconds:
                time.sleep(self.settings.engine.test_hold_batch_seconds)
            report = self.processor.process(deliveries)
        finally:
            self.progress.released(len(deliveries))
        # One structured event per batch (common.batch_timing), which the benchmark reads.
        log.info("batch finished %s", report.timing.encode())
        return report.verdict

    def _paused_reason(self) -> str | None:
        """Why the node waits on purpose (a dependency outage), for its liveness record."""
        pause = self.gate.pause()
        return f"{pause.dependency} unreachable" if pause else None

    def _counters(self) -> NodeCounters:
        pause = self.gate.pause()
        return NodeCounters(
            processes=self.pool.processes,
            completed=self.consumer.completed,
            failed=self.consumer.failed,
            batches=self.consumer.batches,
            paused_dependency=pause.dependency if pause else "",
            paused_since=pause.since if pause else 0.0,
        )

    def run(self) -> None:
        """Consume until SIGTERM/SIGINT, then drain and release everything."""
        self._install_signal_handlers()
        self._serve_metrics(self.settings.engine.metrics_port)
        self.sweeper.start()
        self.reaper.start()
        self.upload_sweeper.start()
        self.retention.start()
        self.webhooks.start()
        self.webhook_pruner.start()
        self.control.start()
        try:
            self.consumer.run()
        finally:
            self.close()

    def _serve_metrics(self, port: int) -> None:
        if not port:
            return
        try:
            start_http_server(port)
        except OSError as exc:
            # A second node on the same machine: it still works, only without its own metrics.
            log.warning("metrics port %d unavailable (%s); metrics not served", port, exc)
            return
        log.info("metrics on :%d/metrics", port)

    def stop(self) -> None:
        self.consumer.stop()
        # Work held through an outage goes back to the queue, so that draining ends.
        self.gate.stop()

    def close(self) -> None:
        self.control.stop()
        self.health.remove()
        self.sweeper.stop()
        self.reaper.stop()
        self.upload_sweeper.stop()
        self.retention.stop()
        self.webhooks.stop()
        self.webhook_pruner.stop()
        self.processor.close()
        self.pool.close()
        self.db.close()
        self.inputs.close()
        self.outputs.close()
        log.info("worker node stopped; shared memory released")

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: draining", signum)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
