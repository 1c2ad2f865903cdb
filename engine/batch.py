"""One batch of job messages, from claim to commit.

Each image of a batch is one `ImageWork` record that every stage returns updated: claim (one
statement for the batch) -> download -> render -> upload (on I/O threads; the CPU processes
render) -> commit (one statement for the batch, then one cache pipeline). A record leaves with
exactly one fate, and only then is the consumer told which messages to ack. Bulk stages wait
their turn while interactive images are in flight (`engine.lane_priority`).

A stage that fails because its dependency is down (not only for its image: see
`engine.dependencies`) waits for the dependency and runs again, so an outage uses no delivery.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from common.batch_timing import BatchTiming
from common.cache import ImageCache
from common.errors import DependencyUnavailable, ObjectMissing, ObjectTooLarge
from common.jobs import INTERACTIVE, JobMessage, MalformedJob
from common.storage import ObjectStore, rendition_key
from db import images
from db.images import ImageRecord, Outcome, StoredRendition
from db.pool import Database
from engine import metrics
from engine.cpu_pool import (
    KernelPool,
    RenderCrashed,
    RenderFailed,
    RenderResult,
    RenderTask,
    RenderTimedOut,
    RenditionOutput,
)
from engine.dependencies import DependencyGate, GateStopped
from engine.lane_priority import InteractiveFirst
from engine.slots import SlotArena

log = logging.getLogger(__name__)

T = TypeVar("T")

CRASH_REASON = "processing this image crashed the image decoder process"
# Followed by what the render raised.
RENDER_FAILED_REASON = "rendering this image failed unexpectedly"
MISSING_REASON = "the original image is missing"


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


@dataclass(frozen=True)
class BatchReport:
    """What `BatchProcessor.process` returns: the consumer's verdict, and this batch's timing."""

    verdict: Verdict
    timing: BatchTiming


class Fate(enum.Enum):
    """Where an image stands; every image leaves its batch as UNCLAIMED, FINISHED or RETRY."""

    IN_PROGRESS = "in progress"  # still moving through the stages
    UNCLAIMED = "unclaimed"  # already terminal or deleted: acked without work
    FINISHED = "finished"  # has an outcome (completed or failed) to commit
    CRASHED = "crashed"  # its CPU process died while rendering it
    RETRY = "retry"  # a dependency failed: its message goes back to the queue


@dataclass(frozen=True)
class ImageWork:
    """One image of a batch on its way through the stages; each stage returns it updated."""

    image_id: uuid.UUID
    tags: tuple[int, ...]  # a job may arrive twice in one batch
    request_id: str
    # Interactive work: its stages run on threads of their own and it renders first.
    urgent: bool = False
    fate: Fate = Fate.IN_PROGRESS
    record: ImageRecord | None = None  # set once claimed
    outcome: Outcome | None = None  # set with Fate.FINISHED
    input_length: int = 0  # set by download
    rendered: RenderResult | None = None  # set by render
    crashes: int = 0
    # (stage, seconds) this image spent, summed into the batch's timing by the batch thread.
    seconds: tuple[tuple[str, float], ...] = ()

    def finish(self, outcome: Outcome) -> ImageWork:
        return dataclasses.replace(self, fate=Fate.FINISHED, outcome=outcome)

    def fail(self, reason: str) -> ImageWork:
        return self.finish(Outcome(self.image_id, "failed", error=reason))

    def retry(self) -> ImageWork:
        return dataclasses.replace(self, fate=Fate.RETRY)

    def crashed(self) -> ImageWork:
        return dataclasses.replace(self, fate=Fate.CRASHED, crashes=self.crashes + 1)

    def timed(self, stage: str, started: float) -> ImageWork:
        """This record with the seconds since `started` counted for `stage`."""
        elapsed = time.perf_counter() - started
        metrics.STAGE_SECONDS.labels(stage).observe(elapsed)
        return dataclasses.replace(self, seconds=(*self.seconds, (stage, elapsed)))


@dataclass(frozen=True)
class _Slots:
    """The input and output shared-memory slots one image holds through its stages."""

    input: int
    output: int


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
        render_timeout: float | None = None,
        gate: DependencyGate | None = None,
        urgent_io_threads: int = 1,
        lanes: bool = True,
        interactive_first: InteractiveFirst | None = None,
    ) -> None:
        """`io_threads` take bulk images through their stages and `urgent_io_threads` the
        interactive ones, so interactive work never queues behind a bulk backlog; each thread
        holds one pair of slots at a time, so the two together must not exceed the arenas'
        slots; with `lanes` off (RABBITMQ_LANES=false) every image is bulk work here too.
        `render_timeout`: seconds one image's render may take (MAX_RENDER_SECONDS);
        None: no deadline. `gate` holds stages through dependency outages; without one, every
        dependency failure counts against the image's delivery limit. `interactive_first`
        holds bulk stages while interactive images are in flight (its default bounds)."""
        self._db = db
        self._store = store
        self._cache = cache
        self._pool = pool
        self._inputs = inputs
        self._outputs = outputs
        self._delivery_limit = delivery_limit
        self._render_timeout = render_timeout
        self._gate = gate or DependencyGate({})
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="engine-io")
        self._urgent_io = ThreadPoolExecutor(
            max_workers=urgent_io_threads, thread_name_prefix="engine-urgent"
        )
        self._interactive_first = interactive_first or InteractiveFirst()
        self._lanes = lanes

    def close(self) -> None:
        self._io.shutdown(wait=True)
        self._urgent_io.shutdown(wait=True)

    def process(self, deliveries: list[Delivery]) -> BatchReport:
        """Take every image of the batch through the stages; safe to run for two batches at
        once (nothing here is shared between batches but the arenas and the CPU pool)."""
        metrics.BATCH_SIZE.observe(len(deliveries))
        work, malformed = self._decode(deliveries)
        urgent = any(w.urgent for w in work)
        with self._interactive_first.interactive() if urgent else contextlib.nullcontext():
            return self._process(len(deliveries), work, malformed, bulk=not urgent)

    def _process(
        self, size: int, work: list[ImageWork], malformed: list[int], *, bulk: bool
    ) -> BatchReport:
        batch_seconds: dict[str, float] = {}
        # A bulk batch waits its turn before its claim, each image's stages and its commit,
        # while interactive images are in flight (engine.lane_priority).
        if bulk:
            self._bulk_turn()
        started = time.perf_counter()
        work = self._claim(work)
        if work:
            batch_seconds["claim"] = time.perf_counter() - started
        work = self._run_stages(work)
        work = self._retry_crashed(work)
        work = [self._give_up_on_last_attempt(w) for w in work]
        if any(w.fate is Fate.FINISHED for w in work):
            if bulk:
                self._bulk_turn()
            started = time.perf_counter()
            work = self._commit(work)
            batch_seconds["commit"] = time.perf_counter() - started
        return _report(size, work, malformed, batch_seconds)

    def _bulk_turn(self) -> None:
        """Wait until bulk work may start its next stage (see `engine.lane_priority`)."""
        held = self._interactive_first.bulk_turn()
        if held > 0:
            metrics.STAGE_SECONDS.labels("bulk_hold").observe(held)

    # -- stages of the whole batch ------------------------------------------------------------

    def _decode(self, deliveries: list[Delivery]) -> tuple[list[ImageWork], list[int]]:
        """One record per image (a job may arrive twice), and the tags of malformed messages."""
        tags: dict[uuid.UUID, list[int]] = defaultdict(list)
        jobs: dict[uuid.UUID, JobMessage] = {}
        malformed: list[int] = []
        for delivery in deliveries:
            try:
                job = JobMessage.decode(delivery.body)
            except MalformedJob as exc:
                log.error("dead-lettering a malformed message: %s", exc)
                malformed.append(delivery.tag)
                continue
            tags[job.image_id].append(delivery.tag)
            jobs[job.image_id] = job
        work = [
            ImageWork(
                image_id,
                tuple(t),
                jobs[image_id].request_id,
                urgent=self._lanes and jobs[image_id].lane == INTERACTIVE,
            )
            for image_id, t in tags.items()
        ]
        return work, malformed

    def _claim(self, work: list[ImageWork]) -> list[ImageWork]:
        if not work:
            return work
        try:
            claimed = self._through_outages(lambda: self._claim_rows(work))
        except DependencyUnavailable:
            log.warning("database unavailable while claiming a batch; requeueing it")
            return [w.retry() for w in work]
        records = {r.id: r for r in claimed}
        return [
            self._over_attempts(dataclasses.replace(w, record=records[w.image_id]))
            if w.image_id in records
            else dataclasses.replace(w, fate=Fate.UNCLAIMED)
            for w in work
        ]

    def _over_attempts(self, work: ImageWork) -> ImageWork:
        """Fail at once an image claimed more often than the limit allows: its earlier attempts
        ended with no outcome at all (the node was killed while holding it), so another try
        would most likely end the same way."""
        assert work.record is not None
        if work.record.attempts <= self._delivery_limit:
            return work
        log.error(
            "image %s: claimed %d times without an outcome", work.image_id, work.record.attempts
        )
        return work.fail(
            f"gave up after {self._delivery_limit} attempts: processing it was interrupted "
            "every time (the worker stopped while holding it); upload the image again"
        )

    def _claim_rows(self, work: list[ImageWork]) -> list[ImageRecord]:
        with self._db.one_statement() as conn:
            return images.claim_batch(conn, [w.image_id for w in work])

    def _through_outages(self, call: Callable[[], T]) -> T:
        """`call()`; while it fails because its dependency is down (its probe fails too), wait
        for the dependency and call again. A failure while the dependency answers is raised."""
        while True:
            try:
                return call()
            except GateStopped:
                raise
            except DependencyUnavailable as exc:
                if not self._gate.hold_if_down(exc.dependency):
                    raise

    def _run_stages(self, work: list[ImageWork]) -> list[ImageWork]:
        """Download, render and upload every image still in progress, on the I/O threads of
        its lane."""
        moving = [w for w in work if w.fate is Fate.IN_PROGRESS]
        if not moving:
            return work
        running = [
            (self._urgent_io if w.urgent else self._io).submit(self._through_stages, w)
            for w in moving
        ]
        done = {w.image_id: w for w in (future.result() for future in running)}
        return [done.get(w.image_id, w) for w in work]

    def _retry_crashed(self, work: list[ImageWork]) -> list[ImageWork]:
        """Images whose CPU process died get one more try; crashing a second one fails them.
        Only the crashed image's own render fails: the others, here and in any other batch,
        run on other processes."""
        crashed = [w for w in work if w.fate is Fate.CRASHED]
        if not crashed:
            return work
        log.warning("a CPU process died; retrying %d images", len(crashed))
        again = [dataclasses.replace(w, fate=Fate.IN_PROGRESS) for w in crashed]
        work = self._run_stages([*[w for w in work if w.fate is not Fate.CRASHED], *again])
        return [self._fail_crashed_twice(w) for w in work]

    @staticmethod
    def _fail_crashed_twice(work: ImageWork) -> ImageWork:
        if work.fate is not Fate.CRASHED:
            return work
        log.error("image %s crashed a CPU process twice; failing it", work.image_id)
        return work.fail(CRASH_REASON)

    def _give_up_on_last_attempt(self, work: ImageWork) -> ImageWork:
        """Fail, with a reason, a claimed image that failed for its own sake (not an outage) on
        its last attempt; not while the node stops, when work held through an outage is given
        back. Attempts are the image's claims, counted in its row: a delivery lost to a broker
        outage claimed nothing, so it uses none."""
        if work.fate is not Fate.RETRY or work.record is None:
            return work
        if work.record.attempts < self._delivery_limit:
            return work
        if self._gate.stopping:
            return work
        log.error("image %s: giving up after %d deliveries", work.image_id, self._delivery_limit)
        return work.fail(
            f"gave up after {self._delivery_limit} attempts: a dependency (storage, database) "
            "kept failing; upload the image again"
        )

    def _commit(self, work: list[ImageWork]) -> list[ImageWork]:
        """Write every outcome in one statement; if the database is away, requeue them all."""
        outcomes = [w.outcome for w in work if w.outcome is not None]
        if not outcomes:
            return work
        try:
            updated = self._through_outages(lambda: self._commit_rows(outcomes))
        except DependencyUnavailable:
            log.warning("database unavailable while committing a batch; requeueing it")
            return [w.retry() if w.fate is Fate.FINISHED else w for w in work]
        self._remove_orphans(outcomes, updated)
        self._cache.invalidate((o.id for o in outcomes), announce=True)
        for w in work:
            if w.outcome is not None:
                _record_committed(w.outcome, w.request_id)
        return work

    def _commit_rows(self, outcomes: list[Outcome]) -> set[uuid.UUID]:
        with self._db.one_statement() as conn:
            return images.commit_batch(conn, outcomes)

    def _remove_orphans(self, outcomes: list[Outcome], updated: set[uuid.UUID]) -> None:
        """Delete results stored for images whose row was deleted, or cancelled, while they were
        processed: no result object may outlive its image or belong to a cancelled one. (A row
        another delivery completed meanwhile keeps its result: it has the same key.)"""
        stale = [o for o in outcomes if o.id not in updated and o.renditions]
        if not stale:
            return
        with self._db.transaction() as conn:
            rows = images.get_images(conn, [o.id for o in stale])
        kept = {r.id for r in rows if r.status != "cancelled"}
        for outcome in stale:
            if outcome.id not in kept:
                for rendition in outcome.renditions:
                    self._store.delete_result(rendition.key)

    # -- stages of one image, on an I/O thread ------------------------------------------------

    def _through_stages(self, work: ImageWork) -> ImageWork:
        stages: tuple[Callable[[ImageWork, _Slots], ImageWork], ...] = (
            self._download,
            self._render,
            self._upload,
        )
        slots = _Slots(self._inputs.acquire(), self._outputs.acquire())
        try:
            for stage in stages:
                if not work.urgent:
                    self._bulk_turn()
                work = stage(work, slots)
                if work.fate is not Fate.IN_PROGRESS:
                    break
            return work
        finally:
            self._inputs.release(slots.input)
            self._outputs.release(slots.output)

    def _download(self, work: ImageWork, slots: _Slots) -> ImageWork:
        assert work.record is not None
        started = time.perf_counter()
        key = work.record.original_key
        # Released on leaving, whatever still refers to it (a held exception's frames): the
        # arena cannot be unmapped while a view of it is alive.
        with self._inputs.view(slots.input) as buffer:
            try:
                length = self._through_outages(lambda: self._store.read_original_into(key, buffer))
            except ObjectMissing:
                return work.fail(MISSING_REASON)
            except ObjectTooLarge as exc:
                return work.fail(exc.message)
            except DependencyUnavailable:
                return work.retry()
        return dataclasses.replace(work, input_length=length).timed("download", started)

    def _render(self, work: ImageWork, slots: _Slots) -> ImageWork:
        started = time.perf_counter()
        try:
            result = self._pool.render(
                self._task(work, slots), timeout=self._render_timeout, urgent=work.urgent
            )
        except RenderCrashed:
            return work.crashed()
        except RenderTimedOut:
            # Not retried: the same input would take as long again, on every delivery.
            reason = f"took longer than {self._render_timeout:g} s to render"
            log.info("image %s failed: %s", work.image_id, reason)
            return work.timed("render", started).fail(reason)
        except RenderFailed as exc:
            # The image's own failure, never its batch's: the same input would raise again on
            # every delivery, and the other images of the batch rendered on other processes.
            log.error("image %s: %s\n%s", work.image_id, exc, exc.traceback)
            return work.timed("render", started).fail(f"{RENDER_FAILED_REASON} ({exc.description})")
        work = work.timed("render", started)
        work = dataclasses.replace(
            work, rendered=result, seconds=(*work.seconds, ("kernel_cpu", result.cpu_seconds))
        )
        metrics.KERNEL_CPU_SECONDS.inc(result.cpu_seconds)
        if result.error is not None:
            log.info("image %s failed: %s", work.image_id, result.error)
            return work.fail(result.error)
        return work

    def _task(self, work: ImageWork, slots: _Slots) -> RenderTask:
        """The render of the renditions this image lacks (all of them on a first render)."""
        assert work.record is not None
        have = {r.name for r in work.record.stored_renditions}
        asked = work.record.requested
        if asked is None and not have:
            return RenderTask(slots.input, work.input_length, slots.output)
        wanted = asked if asked is not None else tuple(r.name for r in self._pool.renditions)
        # A redelivered job whose renditions are all stored renders them again (same keys).
        missing = tuple(name for name in wanted if name not in have) or wanted
        return RenderTask(slots.input, work.input_length, slots.output, missing)

    def _upload(self, work: ImageWork, slots: _Slots) -> ImageWork:
        """Store every rendition; the outcome lists them with those the image already had."""
        result = work.rendered
        assert result is not None and work.record is not None
        started = time.perf_counter()
        try:
            stored = [
                self._store_rendition(work.image_id, output, result, slots)
                for output in result.outputs
            ]
        except DependencyUnavailable:
            return work.retry()
        renditions = self._merged(work.record, stored)
        main = renditions[0]
        return work.timed("upload", started).finish(
            Outcome(
                work.image_id,
                "completed",
                result_key=main.key,
                result_content_type=main.content_type,
                result_width=main.width,
                result_height=main.height,
                renditions=renditions,
                requested_renditions=work.record.requested_renditions,
                # Every output the image has now, those of earlier renders included: its
                # batch's bytes out count the image as it stands, not only this render.
                result_size_bytes=sum(r.bytes or 0 for r in renditions),
            )
        )

    def _store_rendition(
        self, image_id: uuid.UUID, output: RenditionOutput, result: RenderResult, slots: _Slots
    ) -> StoredRendition:
        first = output.name == self._pool.renditions[0].name
        key = rendition_key(image_id, output.name, output.content_type, first=first)
        end = output.offset + output.length
        data = result.oversized_output
        payload = (
            self._outputs.view(slots.output)[output.offset : end]
            if data is None
            else memoryview(data)[output.offset : end]
        )
        try:
            # Kept with the rendition so a batch archive never reads an object to know its CRC.
            checksum = zlib.crc32(payload)
            self._through_outages(lambda: self._store.put_result(key, payload, output.content_type))
        finally:
            payload.release()
        return StoredRendition(
            output.name,
            key,
            output.content_type,
            output.width,
            output.height,
            output.length,
            checksum,
        )

    def _merged(
        self, record: ImageRecord, made: list[StoredRendition]
    ) -> tuple[StoredRendition, ...]:
        """The image's renditions after this render, in configuration order (names no longer
        configured last): those just made replace any of the same name."""
        by_name = {r.name: r for r in record.stored_renditions}
        by_name.update((r.name, r) for r in made)
        order = {r.name: index for index, r in enumerate(self._pool.renditions)}
        return tuple(sorted(by_name.values(), key=lambda r: order.get(r.name, len(order))))


def _report(
    size: int, work: Iterable[ImageWork], malformed: list[int], batch_seconds: dict[str, float]
) -> BatchReport:
    """The consumer's verdict and the batch's timing, from the fate of each record."""
    verdict = Verdict(dead_letter=list(malformed))
    stages: dict[str, float] = defaultdict(float)
    for w in work:
        if w.fate is Fate.RETRY:
            verdict.requeue.extend(w.tags)
        elif w.fate is Fate.UNCLAIMED:
            verdict.ack.extend(w.tags)
        elif w.fate is Fate.FINISHED and w.outcome is not None:  # committed
            verdict.ack.extend(w.tags)
            if w.outcome.status == "completed":
                verdict.completed += 1
            else:
                verdict.failed += 1
        else:
            raise AssertionError(f"image {w.image_id} left its batch without a fate: {w.fate}")
        for stage, seconds in w.seconds:
            stages[stage] += seconds
    stages.update(batch_seconds)
    timing = BatchTiming(
        size=size,
        completed=verdict.completed,
        failed=verdict.failed,
        requeued=len(verdict.requeue),
        stages=dict(stages),
    )
    return BatchReport(verdict, timing)


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
