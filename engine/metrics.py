"""Prometheus metrics of a worker node, served on its metrics port (`METRICS_PORT`)."""

from __future__ import annotations

import re

from prometheus_client import Counter, Gauge, Histogram

STAGE_SECONDS = Histogram(
    "pixelmill_engine_stage_seconds",
    "Time spent per image (download, render, upload) or per batch (claim, commit); bulk_hold: "
    "a bulk stage waiting for interactive work in flight (observed only when it waited).",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram(
    "pixelmill_engine_batch_size",
    "Messages per batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
IMAGES = Counter("pixelmill_engine_images", "Images finished, by outcome.", ["outcome"])
FAILURES = Counter("pixelmill_engine_failures", "Failed images, by reason.", ["reason"])
REQUEUED = Counter("pixelmill_engine_requeued", "Messages returned to the queue (transient).")
KERNEL_CPU_SECONDS = Counter(
    "pixelmill_engine_kernel_cpu_seconds", "CPU seconds spent in the image kernel."
)
QUEUE_DEPTH = Gauge("pixelmill_engine_queue_depth", "Ready messages in all job queues together.")
LANE_DEPTH = Gauge(
    "pixelmill_engine_lane_depth",
    "Ready messages per job queue: interactive, bulk.<shard>, base.",
    ["queue"],
)
SLOTS_IN_USE = Gauge("pixelmill_engine_slots_in_use", "Shared-memory image slots in use.")
PROCESSES = Gauge("pixelmill_engine_processes", "CPU processes of this node.")
PAUSED = Gauge(
    "pixelmill_engine_paused",
    "1 while this node holds its work because the dependency does not answer, else 0.",
    ["dependency"],
)

_REASONS = (
    ("too_large", re.compile(r"pixels|too large|larger than|memory", re.I)),
    ("too_slow", re.compile(r"took longer than", re.I)),
    ("crashed", re.compile(r"crashed", re.I)),
    ("gave_up", re.compile(r"gave up", re.I)),
    ("missing_original", re.compile(r"missing", re.I)),
    ("undecodable", re.compile(r"decod|corrupt|truncat|not a|unsupported|invalid", re.I)),
)


def failure_reason(error: str) -> str:
    """A small fixed set of labels for failure messages (free text would explode cardinality)."""
    for label, pattern in _REASONS:
        if pattern.search(error):
            return label
    return "other"


def set_queue_depths(depths: dict[str, int]) -> None:
    """The gauges of the job queues: each lane and shard (a bounded label set, one value per
    queue the node consumes), and their sum."""
    QUEUE_DEPTH.set(sum(depths.values()))
    for queue, depth in depths.items():
        LANE_DEPTH.labels(queue).set(depth)
