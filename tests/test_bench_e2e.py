"""Benchmark statistics without services: end-to-end numbers from an upload report, and the
engine node's per-batch stage lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.e2e import e2e_statistics
from bench.engine_bench import (
    EngineRunSpec,
    NodeSettings,
    _run_row,
    cpu_used,
    parse_stage_lines,
    stage_medians_ms,
)
from bench.procstat import MemorySampler
from bench.sweep import best_row
from common.batch_timing import BatchTiming
from ingest.client import FileResult, RequestRecord, UploadReport

T0 = 1_000.0


def _file(index: int, outcome: str, completed_after: float | None, reason: str | None = None):
    item = FileResult(Path(f"img-{index}.jpg"), f"img-{index}.jpg", f"{index:064x}", 100)
    item.outcome, item.reason = outcome, reason
    item.request_started, item.request_ended = T0, T0 + 0.5
    if outcome != "rejected":
        item.image_id = f"id-{index}"
        item.accepted_at = T0 + 0.5
    if completed_after is not None:
        item.completed_at = T0 + completed_after
    return item


def _six_image_report() -> UploadReport:
    """Two bulk requests of three: four completed, one failed in the engine, one rejected."""
    report = UploadReport(route="bulk", started_at=T0, uploads_ended_at=T0 + 1.0)
    report.files = [
        _file(0, "completed", 1.0),
        _file(1, "completed", 2.0),
        _file(2, "completed", 3.0),
        _file(3, "completed", 4.0),
        _file(4, "failed", 2.5, reason="cannot decode"),
        _file(5, "rejected", None, reason="unsupported_media_type: not an image"),
    ]
    report.requests = [
        RequestRecord(T0, T0 + 0.5, 207, 3, 1),
        RequestRecord(T0, T0 + 1.0, 207, 3, 1),
    ]
    report.finished_at = T0 + 4.0
    return report


def test_failed_and_rejected_images_count_as_failures_not_throughput() -> None:
    stats = e2e_statistics(_six_image_report())

    assert (stats["completed"], stats["failed"], stats["rejected"]) == (4, 1, 1)
    assert stats["failures"] == 2
    # 4 completed over the 4 s from the first request to the last completion; the failed
    # image's completion time does not count.
    assert stats["completed_images_per_s"] == pytest.approx(1.0)
    assert stats["accepted_images_per_s"] == pytest.approx(5.0)  # the rejected one is not
    assert stats["upload_requests_per_s"] == pytest.approx(2.0)
    assert stats["failure_reasons"] == {
        "cannot decode": 1,
        "unsupported_media_type: not an image": 1,
    }


def test_latency_percentiles_cover_requests_and_completed_images_only() -> None:
    stats = e2e_statistics(_six_image_report())

    upload = stats["latency_ms"]["upload"]
    assert upload["p50"] == pytest.approx(750.0)  # requests of 500 and 1000 ms
    completed = stats["latency_ms"]["completed"]
    assert completed["p50"] == pytest.approx(2500.0)  # 1, 2, 3, 4 s; the failed 2.5 s excluded
    assert completed["p99"] == pytest.approx(3970.0)


def test_a_run_where_everything_failed_has_zero_throughput_and_no_latency() -> None:
    report = UploadReport(route="single", started_at=T0, uploads_ended_at=T0 + 1.0)
    report.files = [_file(0, "rejected", None, "too_many_requests: slow down")]
    report.requests = [RequestRecord(T0, T0 + 1.0, 429, 1, 8)]

    stats = e2e_statistics(report)

    assert stats["completed_images_per_s"] == 0.0
    assert stats["failures"] == 1
    assert stats["latency_ms"] == {}


def _batch_line(
    size: int, completed: int, failed: int, requeued: int, stages: dict[str, float] | None
) -> str:
    """The node's per-batch log line; `stages` None makes one torn by a crash."""
    prefix = "2026-11-28 10:00:01 INFO engine.node: batch finished"
    timing = BatchTiming(size, completed, failed, requeued, stages or {"claim": 0.001})
    encoded = timing.encode()
    return f"{prefix} {encoded if stages is not None else encoded[:40]}"


def _stages(
    claim: float, download: float, render: float, kernel: float, commit: float
) -> dict[str, float]:
    return {
        "claim": claim,
        "download": download,
        "render": render,
        "kernel_cpu": kernel,
        "upload": download / 2,
        "commit": commit,
    }


NODE_LOG = "\n".join(
    [
        "2026-11-28 10:00:00 INFO engine.node worker node: processes=2 prefetch=64 batch_size=16",
        _batch_line(16, 16, 0, 0, _stages(0.016, 0.32, 1.6, 1.28, 0.008)),
        _batch_line(4, 3, 1, 0, _stages(0.004, 0.12, 0.4, 0.36, 0.004)),
        _batch_line(8, 8, 0, 0, _stages(0.008, 0.08, 0.8, 0.64, 0.016)),
        _batch_line(2, 0, 0, 2, None),  # a line torn by a crash
        "2026-11-28 10:00:04 INFO engine.node worker node stopped; shared memory released",
    ]
)


def test_stage_lines_are_parsed_and_the_torn_one_skipped() -> None:
    batches = parse_stage_lines(NODE_LOG.splitlines())

    assert [(b.size, b.completed, b.failed, b.requeued) for b in batches] == [
        (16, 16, 0, 0),
        (4, 3, 1, 0),
        (8, 8, 0, 0),
    ]
    assert batches[0].stages["render"] == pytest.approx(1.6)


def test_stage_medians_are_per_image_milliseconds() -> None:
    medians = stage_medians_ms(parse_stage_lines(NODE_LOG.splitlines()))

    # render per image: 100, 100, 100 ms; download: 20, 30, 10 ms; commit: 0.5, 1, 2 ms.
    assert medians["render"] == pytest.approx(100.0)
    assert medians["download"] == pytest.approx(20.0)
    assert medians["commit"] == pytest.approx(1.0)
    assert set(medians) == {"claim", "download", "render", "kernel_cpu", "upload", "commit"}


def test_node_over_kernel_ratio_uses_the_kernel_cpu_the_node_logged_in_the_same_run() -> None:
    # 28 images; the node's CPU processes logged 1.28 + 0.36 + 0.64 = 2.28 s inside the kernel.
    batches = parse_stage_lines(NODE_LOG.splitlines())
    spec = EngineRunSpec("jpeg-small", 28, NodeSettings())
    row = _run_row(
        spec,
        wall=2.0,
        statuses={"completed": 27, "failed": 1},
        cpu_seconds=cpu_used(
            {"node": {7: 10.0}, "seaweedfs": {8: 1.0, 9: 0.5}},
            # pid 9 exited mid-run: it must not count as negative time.
            {"node": {7: 12.622}, "seaweedfs": {8: 1.28}},
        ),
        sampler=MemorySampler(root=0),
        batches=batches,
    )

    assert row["node_cpu_s_per_image"] == pytest.approx(2.622 / 28)
    assert row["node_kernel_cpu_s_per_image"] == pytest.approx(2.28 / 28)
    assert row["cpu_ratio_in_node"] == pytest.approx(2.622 / 2.28)
    assert row["services_cpu_s_per_image"] == {"seaweedfs": pytest.approx(0.01)}
    assert row["images_per_s"] == pytest.approx(13.5)


def test_the_best_sweep_setting_is_never_one_with_failures() -> None:
    rows = [
        {"processes": 1, "images_per_s": 10.0, "failed": 0},
        {"processes": 2, "images_per_s": 30.0, "failed": 1},
        {"processes": 2, "images_per_s": 18.0, "failed": 0},
    ]

    assert best_row(rows, "images_per_s") == rows[2]
    assert best_row(rows[1:2], "images_per_s") is None
