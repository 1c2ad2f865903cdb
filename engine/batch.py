"""One batch of job messages, from claim to commit.

Claim every image of the batch in one statement, run each through download -> render -> upload on
I/O threads (the CPU processes do the rendering), then write every outcome in one statement,
invalidate the cache in one pipeline, and only then tell the consumer which messages to ack.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from common.cache import ImageCache
from common.errors import DependencyUnavailable, ObjectMissing, ObjectTooLarge
from common.jobs import JobMessage, MalformedJob
from common.storage import ObjectStore, result_key
from db import images
from db.images import ImageRecord, Outcome
from db.pool import Database
from engine import metrics
from engine.cpu_pool import KernelPool, RenderCrashed, RenderResult, RenderTask
from engine.slots import SlotArena

log = logging.getLogger(__name__)

CRASH_REASON = "processing this image crashed the image decoder process"


@dataclass(frozen=True)
class Delivery:
    """A job message as the consumer received it."""

    tag: int
    body: bytes
    # Earlier deliveries of this message (RabbitMQ quorum queues' `x-delivery-count`).
    previous_deliveries: int = 0


@dataclass
class Verdict:
    """What the consumer must do with each delivery tag of a batch."""

    ack: list[int] = field(default_factory=list)
    requeue: list[int] = field(default_factory=list)
    dead_letter: list[int] = field(default_factory=list)
    completed: int = 0
    failed: int = 0


def _record_committed(outcome: Outcome, request_id: str) -> None:
    """Metrics and one log event for an image whose outcome is committed, carrying the id of
    the request that uploaded it."""
    metrics.IMAGES.labels(outcome.status).inc()
    if outcome.status == "failed":
        metrics.FAILURES.labels(metrics.failure_reason(outcome.error or "")).inc()
    log.info(
        "image %s %s",
        outcome.id,
        outcome.status,
        extra={
            "image_id": str(outcome.id),
            "request_id": request_id,
            "status": outcome.status,
            "reason": outcome.error,
        },
    )


class Transient(Exception):
    """A dependency failed for one image; its message goes back to the queue."""


class ProcessCrashed(Exception):
    """The CPU process rendering this image died."""


@dataclass
class StageTimes:
    """Seconds spent per stage over a batch (summed over images), for logs and metrics."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, stage: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        self.seconds[stage] += elapsed
        metrics.STAGE_SECONDS.labels(stage).observe(elapsed)


class BatchProcessor:
    """Owns the per-batch pipeline; shares the arenas and the CPU pool with other batches."""

    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        cache: ImageCache,
        pool: KernelPool,
        inputs: SlotArena,
        outputs: SlotArena,
        io_threads: int,
        delivery_limit: int,
    ) -> None:
        self._db = db
        self._store = store
        self._cache = cache
        self._pool = pool
        self._inputs = inputs
        self._outputs = outputs
        self._delivery_limit = delivery_limit
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="engine-io")
        self.last_stage_times = StageTimes()

    def close(self) -> None:
        self._io.shutdown(wait=True)

    def process(self, deliveries: list[Delivery]) -> Verdict:
        verdict = Verdict()
        metrics.BATCH_SIZE.observe(len(deliveries))
        tags_by_image, request_ids = self._decode(deliveries, verdict)
        last_chance = self._on_last_delivery(deliveries, tags_by_image)
        if not tags_by_image:
            return verdict
        times = StageTimes()
        started = time.perf_counter()
        try:
            with self._db.transaction() as conn:
                claimed = images.claim_batch(conn, list(tags_by_image))
        except DependencyUnavailable:
            log.warning("database unavailable while claiming a batch; requeueing it")
            verdict.requeue.extend(t for tags in tags_by_image.values() for t in tags)
            return verdict
        times.add("claim", started)
        claimed_ids = {r.id for r in claimed}
        for image_id, tags in tags_by_image.items():
            if image_id not in claimed_ids:  # already terminal or deleted: nothing to do
                verdict.ack.extend(tags)
        outcomes, transient = self._run(claimed, times)
        outcomes.extend(self._give_up(transient, last_chance))
        self._commit(outcomes, transient, tags_by_image, request_ids, verdict, times)
        self.last_stage_times = times
        return verdict

    def _decode(
        self, deliveries: list[Delivery], verdict: Verdict
    ) -> tuple[dict[uuid.UUID, list[int]], dict[uuid.UUID, str]]:
        """Delivery tags by image (a job may arrive twice) and the request that sent each."""
        tags_by_image: dict[uuid.UUID, list[int]] = defaultdict(list)
        request_ids: dict[uuid.UUID, str] = {}
        for delivery in deliveries:
            try:
                job = JobMessage.decode(delivery.body)
            except MalformedJob as exc:
                log.error("dead-lettering a malformed message: %s", exc)
                verdict.dead_letter.append(delivery.tag)
                continue
            tags_by_image[job.image_id].append(delivery.tag)
            request_ids[job.image_id] = job.request_id
        return tags_by_image, request_ids

    def _on_last_delivery(
        self, deliveries: list[Delivery], tags_by_image: dict[uuid.UUID, list[int]]
    ) -> set[uuid.UUID]:
        """Images whose message will be dead-lettered by the broker if it is requeued again."""
        final_tags = {
            d.tag for d in deliveries if d.previous_deliveries + 1 >= self._delivery_limit
        }
        return {i for i, tags in tags_by_image.items() if final_tags.intersection(tags)}

    def _give_up(self, transient: list[uuid.UUID], last_chance: set[uuid.UUID]) -> list[Outcome]:
        """Fail, with a reason, the images that failed transiently on their last delivery."""
        given_up = [i for i in transient if i in last_chance]
        for image_id in given_up:
            transient.remove(image_id)
            log.error("image %s: giving up after %d deliveries", image_id, self._delivery_limit)
        reason = (
            f"gave up after {self._delivery_limit} attempts: a dependency (storage, database) "
            "kept failing; upload the image again"
        )
        return [Outcome(i, "failed", error=reason) for i in given_up]

    def _run(
        self, records: list[ImageRecord], times: StageTimes
    ) -> tuple[list[Outcome], list[uuid.UUID]]:
        outcomes: list[Outcome] = []
        transient: list[uuid.UUID] = []
        crashed: list[ImageRecord] = []
        futures = [(r, self._io.submit(self._process_one, r, times)) for r in records]
        for record, future in futures:
            try:
                outcomes.append(future.result())
            except Transient:
                transient.append(record.id)
            except ProcessCrashed:
                crashed.append(record)
        if crashed:
            outcomes.extend(self._retry_crashed(crashed, transient, times))
        return outcomes, transient

    def _retry_crashed(
        self, crashed: list[ImageRecord], transient: list[uuid.UUID], times: StageTimes
    ) -> list[Outcome]:
        """A CPU process died: retry each affected image once more; crashing a second one fails
        it. Only the crashed image's own render failed: the others ran on other processes."""
        log.warning("a CPU process died; retrying %d images", len(crashed))
        outcomes = []
        for record in crashed:
            try:
                outcomes.append(self._process_one(record, times))
            except Transient:
                transient.append(record.id)
            except ProcessCrashed:
                log.error("image %s crashed a CPU process twice; failing it", record.id)
                outcomes.append(Outcome(record.id, "failed", error=CRASH_REASON))
        return outcomes

    def _process_one(self, record: ImageRecord, times: StageTimes) -> Outcome:
        in_slot = self._inputs.acquire()
        out_slot = self._outputs.acquire()
        try:
            length = self._download(record, in_slot, times)
            if isinstance(length, Outcome):
                return length
            started = time.perf_counter()
            try:
                result = self._pool.render(RenderTask(in_slot, length, out_slot))
            except RenderCrashed as exc:
                raise ProcessCrashed(str(record.id)) from exc
            times.add("render", started)
            times.seconds["kernel_cpu"] += result.cpu_seconds
            metrics.KERNEL_CPU_SECONDS.inc(result.cpu_seconds)
            if result.error is not None:
                log.info("image %s failed: %s", record.id, result.error)
                return Outcome(record.id, "failed", error=result.error)
            return self._upload(record, result, out_slot, times)
        finally:
            self._inputs.release(in_slot)
            self._outputs.release(out_slot)

    def _download(self, record: ImageRecord, slot: int, times: StageTimes) -> int | Outcome:
        started = time.perf_counter()
        try:
            length = self._store.read_original_into(record.original_key, self._inputs.view(slot))
        except ObjectMissing:
            return Outcome(record.id, "failed", error="the original image is missing")
        except ObjectTooLarge as exc:
            return Outcome(record.id, "failed", error=str(exc))
        except DependencyUnavailable as exc:
            raise Transient(str(exc)) from exc
        times.add("download", started)
        return length

    def _upload(
        self, record: ImageRecord, result: RenderResult, slot: int, times: StageTimes
    ) -> Outcome:
        started = time.perf_counter()
        key = result_key(record.id, result.content_type)
        data = result.oversized_output
        payload = self._outputs.view(slot)[: result.output_length] if data is None else data
        try:
            self._store.put_result(key, payload, result.content_type)
        except DependencyUnavailable as exc:
            raise Transient(str(exc)) from exc
        finally:
            if isinstance(payload, memoryview):
                payload.release()
        times.add("upload", started)
        return Outcome(
            record.id,
            "completed",
            result_key=key,
            result_content_type=result.content_type,
            result_width=result.width,
            result_height=result.height,
        )

    def _commit(
        self,
        outcomes: list[Outcome],
        transient: list[uuid.UUID],
        tags_by_image: dict[uuid.UUID, list[int]],
        request_ids: dict[uuid.UUID, str],
        verdict: Verdict,
        times: StageTimes,
    ) -> None:
        for image_id in transient:
            verdict.requeue.extend(tags_by_image[image_id])
        if not outcomes:
            return
        started = time.perf_counter()
        try:
            with self._db.transaction() as conn:
                updated = images.commit_batch(conn, outcomes)
        except DependencyUnavailable:
            log.warning("database unavailable while committing a batch; requeueing it")
            verdict.requeue.extend(t for o in outcomes for t in tags_by_image[o.id])
            return
        times.add("commit", started)
        self._remove_orphans(outcomes, updated)
        self._cache.invalidate((o.id for o in outcomes), announce=True)
        for outcome in outcomes:
            verdict.ack.extend(tags_by_image[outcome.id])
            if outcome.status == "completed":
                verdict.completed += 1
            else:
                verdict.failed += 1
            _record_committed(outcome, request_ids.get(outcome.id, ""))

    def _remove_orphans(self, outcomes: list[Outcome], updated: set[uuid.UUID]) -> None:
        """Delete results stored for images whose row was deleted while they were processed."""
        stale = [o for o in outcomes if o.id not in updated and o.result_key]
        if not stale:
            return
        with self._db.transaction() as conn:
            alive = {r.id for r in images.get_images(conn, [o.id for o in stale])}
        for outcome in stale:
            if outcome.id not in alive and outcome.result_key:
                self._store.delete_result(outcome.result_key)
