"""The batch pipeline driven in-process against the session's real PostgreSQL, Redis and S3: each
image of a batch leaves with exactly one fate (completed, failed with its reason, requeued, or
acked without work), and one image's trouble stays its own."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.cache import ImageCache
from common.config import Settings
from common.jobs import BULK, INTERACTIVE, JobMessage
from common.storage import ObjectStore, original_key
from db import images
from db.images import NewImage
from db.pool import Database
from engine.batch import (
    CRASH_REASON,
    MISSING_REASON,
    RENDER_FAILED_REASON,
    BatchProcessor,
    BatchReport,
    Delivery,
)
from engine.cpu_pool import KernelOptions, KernelPool
from engine.lane_priority import InteractiveFirst
from engine.slots import SlotArena
from tests.faults import FailingS3Proxy
from tests.support import (
    CRASH_MARKER,
    FAIL_MARKER,
    StackProbe,
    jpeg,
    paused,
    render_or_misbehave,
    wait_for,
)

MIB = 1024 * 1024
DELIVERY_LIMIT = 3
GAVE_UP_REASON = (
    f"gave up after {DELIVERY_LIMIT} attempts: a dependency (storage, database) kept failing; "
    "upload the image again"
)


class Pipeline:
    """A BatchProcessor wired as a node wires it, with a render function that misbehaves on
    marked inputs, and the means to create pending images and deliver their jobs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.inputs = SlotArena(8, 4 * MIB)
        self.outputs = SlotArena(8, 4 * MIB)
        self.pool = KernelPool(
            2,
            (self.inputs.name, self.inputs.slot_bytes),
            (self.outputs.name, self.outputs.slot_bytes),
            KernelOptions(800, "png", settings.engine.max_pixels),
            render=render_or_misbehave,
        )
        self.db = Database(settings.postgres_url, max_size=4)
        self.store = ObjectStore(settings.storage)
        self.cache = ImageCache.from_url(settings.redis_url, settings.redis_prefix)
        self.proxy = FailingS3Proxy(settings.storage.endpoint)
        self.processor = self.processor_with(self.store)
        self._tags = iter(range(1, 1_000_000))

    def processor_with(
        self,
        store: ObjectStore,
        *,
        io_threads: int = 4,
        urgent_io_threads: int = 1,
        lanes: bool = True,
        interactive_first: InteractiveFirst | None = None,
    ) -> BatchProcessor:
        return BatchProcessor(
            self.db,
            store,
            self.cache,
            self.pool,
            self.inputs,
            self.outputs,
            io_threads=io_threads,
            delivery_limit=DELIVERY_LIMIT,
            urgent_io_threads=urgent_io_threads,
            lanes=lanes,
            interactive_first=interactive_first,
        )

    def pending_image(self, owner: str, original: bytes, *, stored: bool = True) -> uuid.UUID:
        """A `pending` row as the API leaves it, and its original unless `stored` is False."""
        image_id = uuid.uuid4()
        key = original_key(image_id)
        if stored:
            self.store.put_original(key, original, "image/jpeg")
        digest = hashlib.sha256(original).hexdigest()
        row = NewImage(
            image_id, owner, "photo.jpg", "image/jpeg", len(original), digest, 1600, 1200, key
        )
        with self.db.transaction() as conn:
            images.insert_images(conn, [row])
            images.mark_enqueued(conn, [image_id])
        return image_id

    def delivery(
        self, image_id: uuid.UUID, previous_deliveries: int = 0, lane: str = BULK
    ) -> Delivery:
        body = JobMessage(image_id, f"req-{image_id.hex[:8]}", lane).encode()
        return Delivery(next(self._tags), body, previous_deliveries)

    def processor_behind_proxy(self) -> BatchProcessor:
        """A processor whose object store is reached through `self.proxy`."""
        storage = dataclasses.replace(self.settings.storage, endpoint=self.proxy.endpoint)
        return self.processor_with(ObjectStore(storage))

    def close(self) -> None:
        self.processor.close()
        self.proxy.close()
        self.pool.close()
        self.db.close()
        self.inputs.close()
        self.outputs.close()


@pytest.fixture(scope="module")
def pipeline(settings: Settings) -> Iterator[Pipeline]:
    built = Pipeline(settings)
    yield built
    built.close()


def rows(probe: StackProbe, owner: str) -> dict[uuid.UUID, tuple[str, str | None, str | None]]:
    """status, error and result key of each of the owner's images."""
    return {r[0]: (r[1], r[2], r[3]) for r in probe.rows_for(owner)}


def results_of(probe: StackProbe, image_id: uuid.UUID) -> list[str]:
    return [key for key in probe.results() if str(image_id) in key]


def test_an_image_completes_with_one_result_and_the_batch_reports_its_timing(
    pipeline: Pipeline, probe: StackProbe, user_id: str
) -> None:
    image_id = pipeline.pending_image(user_id, jpeg(1600, 1200))
    delivery = pipeline.delivery(image_id)

    report = pipeline.processor.process([delivery])

    assert report.verdict.ack == [delivery.tag]
    assert (report.verdict.requeue, report.verdict.dead_letter) == ([], [])
    assert (report.verdict.completed, report.verdict.failed) == (1, 0)
    assert rows(probe, user_id) == {image_id: ("completed", None, f"results/{image_id}.png")}
    assert results_of(probe, image_id) == [f"results/{image_id}.png"]
    timing = report.timing
    assert (timing.size, timing.completed, timing.failed, timing.requeued) == (1, 1, 0, 0)
    assert set(timing.stages) == {"claim", "download", "render", "kernel_cpu", "upload", "commit"}
    assert all(seconds >= 0 for seconds in timing.stages.values())


def test_a_missing_original_fails_with_its_reason(
    pipeline: Pipeline, probe: StackProbe, user_id: str
) -> None:
    image_id = pipeline.pending_image(user_id, jpeg(900, 600), stored=False)
    delivery = pipeline.delivery(image_id)

    report = pipeline.processor.process([delivery])

    assert report.verdict.ack == [delivery.tag] and report.verdict.requeue == []
    assert (report.verdict.completed, report.verdict.failed) == (0, 1)
    assert rows(probe, user_id) == {image_id: ("failed", MISSING_REASON, None)}
    assert results_of(probe, image_id) == []


def test_a_truncated_jpeg_fails_with_the_decoders_reason(
    pipeline: Pipeline, probe: StackProbe, user_id: str
) -> None:
    image_id = pipeline.pending_image(user_id, jpeg(1600, 1200)[:600])

    report = pipeline.processor.process([pipeline.delivery(image_id)])

    assert report.verdict.failed == 1
    assert rows(probe, user_id) == {image_id: ("failed", "JPEG data could not be decoded", None)}
    assert results_of(probe, image_id) == []


def test_an_image_whose_render_raises_an_unknown_error_fails_alone_and_nothing_is_requeued(
    pipeline: Pipeline, probe: StackProbe, user_id: str
) -> None:
    broken = pipeline.pending_image(user_id, FAIL_MARKER + jpeg(900, 600, seed=1))
    others = [pipeline.pending_image(user_id, jpeg(900, 600, seed=s)) for s in (2, 3)]
    deliveries = [pipeline.delivery(i) for i in (others[0], broken, others[1])]

    report = pipeline.processor.process(deliveries)

    assert sorted(report.verdict.ack) == sorted(d.tag for d in deliveries)
    assert report.verdict.requeue == []
    assert (report.verdict.completed, report.verdict.failed) == (2, 1)
    outcome = rows(probe, user_id)
    status, error, result = outcome.pop(broken)
    assert (status, result) == ("failed", None)
    assert error == f"{RENDER_FAILED_REASON} (RuntimeError: a bug in the render function)"
    assert set(outcome.values()) == {("completed", None, f"results/{i}.png") for i in others}
    assert results_of(probe, broken) == []


def test_a_storage_outage_on_one_image_requeues_it_and_completes_the_other(
    pipeline: Pipeline, probe: StackProbe, user_id: str
) -> None:
    healthy = pipeline.pending_image(user_id, jpeg(900, 600, seed=2))
    unlucky = pipeline.pending_image(user_id, jpeg(900, 600, seed=3))
    pipeline.proxy.failing = {str(unlucky)}
    processor = pipeline.processor_behind_proxy()
    first, second = pipeline.delivery(healthy), pipeline.delivery(unlucky)
    try:
        report = processor.process([first, second])
    finally:
        processor.close()
        pipeline.proxy.failing = set()

    assert report.verdict.ack == [first.tag]
    assert report.verdict.requeue == [second.tag]
    assert (report.verdict.completed, report.verdict.failed) == (1, 0)
    assert report.timing.requeued == 1
    assert rows(probe, user_id) == {
        healthy: ("completed", None, f"results/{healthy}.png"),
        # Not failed: a later delivery will process it.
        unlucky: ("processing", None, None),
    }
    assert results_of(probe, unlucky) == []


def test_an_image_whose_storage_keeps_failing_gives_up_on_its_last_attempt_with_the_reason(
    pipeline: Pipeline, probe: StackProbe, user_id: str
) -> None:
    image_id = pipeline.pending_image(user_id, jpeg(900, 600))
    pipeline.proxy.failing = {str(image_id)}
    processor = pipeline.processor_behind_proxy()
    deliveries = [pipeline.delivery(image_id) for _ in range(DELIVERY_LIMIT)]
    try:
        verdicts = [processor.process([d]).verdict for d in deliveries]
    finally:
        processor.close()
        pipeline.proxy.failing = set()

    assert [v.requeue for v in verdicts[:-1]] == [[d.tag] for d in deliveries[:-1]]
    assert verdicts[-1].ack == [deliveries[-1].tag]
    assert verdicts[-1].requeue == [] and verdicts[-1].dead_letter == []
    assert rows(probe, user_id) == {image_id: ("failed", GAVE_UP_REASON, None)}


def test_deliveries_the_broker_counted_without_a_claim_use_no_attempt(
    pipeline: Pipeline, probe: StackProbe, user_id: str
) -> None:
    """A broker outage returns held messages with a higher delivery count, though the images
    were never claimed: only claims, counted in the row, are an image's attempts."""
    image_id = pipeline.pending_image(user_id, jpeg(900, 600))
    pipeline.proxy.failing = {str(image_id)}
    processor = pipeline.processor_behind_proxy()
    delivery = pipeline.delivery(image_id, previous_deliveries=DELIVERY_LIMIT * 2 - 2)
    try:
        verdict = processor.process([delivery]).verdict
    finally:
        processor.close()
        pipeline.proxy.failing = set()

    assert verdict.requeue == [delivery.tag]
    assert rows(probe, user_id) == {image_id: ("processing", None, None)}


def test_an_image_claimed_past_the_limit_without_an_outcome_fails_without_another_render(
    pipeline: Pipeline, probe: StackProbe, user_id: str
) -> None:
    """Its earlier claims ended with no outcome at all (a node killed while holding it): it is
    failed at claim, not rendered again."""
    image_id = pipeline.pending_image(user_id, CRASH_MARKER + jpeg(900, 600))
    with pipeline.db.transaction() as conn:
        conn.execute("UPDATE images SET attempts = %s WHERE id = %s", (DELIVERY_LIMIT, image_id))
    delivery = pipeline.delivery(image_id)
    processes = sorted(pipeline.pool.pids())

    verdict = pipeline.processor.process([delivery]).verdict

    assert verdict.ack == [delivery.tag] and verdict.failed == 1
    [(status, error, result)] = rows(probe, user_id).values()
    assert (status, result) == ("failed", None)
    assert error is not None and "interrupted every time" in error
    # Had it been rendered, its crash marker would have killed a CPU process.
    assert sorted(pipeline.pool.pids()) == processes


def test_a_redelivered_job_of_a_finished_image_is_acked_without_work_and_junk_dead_lettered(
    pipeline: Pipeline, probe: StackProbe, user_id: str
) -> None:
    image_id = pipeline.pending_image(user_id, jpeg(900, 600))
    pipeline.processor.process([pipeline.delivery(image_id)])
    before = probe.updated_at(image_id)
    again, junk = pipeline.delivery(image_id), Delivery(999_999_999, b"not a job")

    report = pipeline.processor.process([again, junk])

    assert report.verdict.ack == [again.tag] and report.verdict.dead_letter == [junk.tag]
    assert (report.verdict.completed, report.verdict.failed) == (0, 0)
    assert probe.updated_at(image_id) == before
    assert set(report.timing.stages) == {"claim"}, "no image went through the stages"


def test_an_image_that_crashes_its_process_fails_alone_across_two_batches_in_flight(
    pipeline: Pipeline, probe: StackProbe, user_id: str, tmp_path: Path
) -> None:
    def plain(seed: int) -> uuid.UUID:
        return pipeline.pending_image(user_id, jpeg(900, 600, seed=seed))

    poison = pipeline.pending_image(user_id, CRASH_MARKER + jpeg(900, 600))
    batch_a = [poison, plain(1), plain(2), plain(3)]
    held = pipeline.pending_image(user_id, paused(jpeg(900, 600, seed=9), tmp_path))
    batch_b = [held, plain(4), plain(5)]

    with ThreadPoolExecutor(1) as other_batch:
        # Batch B holds a CPU process mid-render for as long as batch A runs.
        running_b = other_batch.submit(
            pipeline.processor.process, [pipeline.delivery(i) for i in batch_b]
        )
        wait_for(lambda: (tmp_path / "started").exists(), timeout=30)
        report_a = pipeline.processor.process([pipeline.delivery(i) for i in batch_a])
        (tmp_path / "release").touch()
        report_b: BatchReport = running_b.result(timeout=120)

    assert (report_a.verdict.completed, report_a.verdict.failed) == (3, 1)
    assert (report_b.verdict.completed, report_b.verdict.failed) == (3, 0)
    assert report_a.verdict.requeue == [] == report_b.verdict.requeue
    statuses = rows(probe, user_id)
    assert statuses.pop(poison) == ("failed", CRASH_REASON, None)
    assert {status for status, _, _ in statuses.values()} == {"completed"}
    assert len(statuses) == 6
    # The render held in batch B ran once: the crashes in batch A never touched it.
    assert (tmp_path / "started").read_text().count("\n") == 1


def test_interactive_work_runs_on_its_own_threads_while_bulk_work_holds_every_bulk_thread(
    pipeline: Pipeline, probe: StackProbe, user_id: str, tmp_path: Path
) -> None:
    # One bulk I/O thread, held by a bulk image mid-render; a second bulk image waits behind it.
    processor = pipeline.processor_with(pipeline.store, io_threads=1, urgent_io_threads=1)
    held = pipeline.pending_image(user_id, paused(jpeg(900, 600, seed=1), tmp_path))
    queued = pipeline.pending_image(user_id, jpeg(900, 600, seed=2))
    interactive = [pipeline.pending_image(user_id, jpeg(900, 600, seed=s)) for s in (3, 4)]
    try:
        with ThreadPoolExecutor(2) as batches:
            bulk = batches.submit(
                processor.process, [pipeline.delivery(held), pipeline.delivery(queued)]
            )
            wait_for(lambda: (tmp_path / "started").exists(), timeout=30)
            urgent = batches.submit(
                processor.process, [pipeline.delivery(i, lane=INTERACTIVE) for i in interactive]
            )
            try:
                report = urgent.result(timeout=60)
                still_held = rows(probe, user_id)[held][0]
            finally:
                (tmp_path / "release").touch()
            bulk_report = bulk.result(timeout=120)
    finally:
        processor.close()

    assert (report.verdict.completed, report.verdict.failed) == (2, 0)
    # The interactive batch was done while the bulk image still held its thread.
    assert still_held == "processing"
    assert (bulk_report.verdict.completed, bulk_report.verdict.failed) == (2, 0)
    assert {rows(probe, user_id)[i][0] for i in [held, queued, *interactive]} == {"completed"}


def test_a_bulk_batch_starts_no_stage_while_an_interactive_image_is_in_flight(
    pipeline: Pipeline, probe: StackProbe, user_id: str, tmp_path: Path
) -> None:
    # Holds as long as the interactive image is in flight, however long that is.
    unbounded = InteractiveFirst(longest_hold_seconds=3600, burst_seconds=3600)
    processor = pipeline.processor_with(pipeline.store, interactive_first=unbounded)
    interactive = pipeline.pending_image(user_id, paused(jpeg(900, 600, seed=7), tmp_path))
    bulk_images = [pipeline.pending_image(user_id, jpeg(900, 600, seed=s)) for s in (8, 9)]
    try:
        with ThreadPoolExecutor(2) as batches:
            urgent = batches.submit(
                processor.process, [pipeline.delivery(interactive, lane=INTERACTIVE)]
            )
            wait_for(lambda: (tmp_path / "started").exists(), timeout=30)
            bulk = batches.submit(processor.process, [pipeline.delivery(i) for i in bulk_images])
            try:
                # Not even claimed: the bulk batch holds before its first statement.
                with pytest.raises(TimeoutError):
                    bulk.result(timeout=2)
                held = {rows(probe, user_id)[i][0] for i in bulk_images}
            finally:
                (tmp_path / "release").touch()
            report = urgent.result(timeout=60)
            bulk_report = bulk.result(timeout=120)
    finally:
        processor.close()

    assert held == {"pending"}
    assert (report.verdict.completed, bulk_report.verdict.completed) == (1, 2)
    assert {rows(probe, user_id)[i][0] for i in [interactive, *bulk_images]} == {"completed"}


def test_with_lanes_off_interactive_jobs_are_bulk_work_inside_the_node_too(
    pipeline: Pipeline, probe: StackProbe, user_id: str, tmp_path: Path
) -> None:
    processor = pipeline.processor_with(
        pipeline.store, io_threads=1, urgent_io_threads=1, lanes=False
    )
    held = pipeline.pending_image(user_id, paused(jpeg(900, 600, seed=5), tmp_path))
    interactive = pipeline.pending_image(user_id, jpeg(900, 600, seed=6))
    try:
        with ThreadPoolExecutor(2) as batches:
            bulk = batches.submit(processor.process, [pipeline.delivery(held)])
            wait_for(lambda: (tmp_path / "started").exists(), timeout=30)
            queued = batches.submit(
                processor.process, [pipeline.delivery(interactive, lane=INTERACTIVE)]
            )
            try:
                # It waits behind the held bulk image for the one bulk I/O thread.
                with pytest.raises(TimeoutError):
                    queued.result(timeout=3)
            finally:
                (tmp_path / "release").touch()
            assert queued.result(timeout=120).verdict.completed == 1
            assert bulk.result(timeout=120).verdict.completed == 1
    finally:
        processor.close()

    assert {rows(probe, user_id)[i][0] for i in (held, interactive)} == {"completed"}
