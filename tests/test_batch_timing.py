"""The per-batch record: what the node logs is what the benchmark reads, in either log format."""

from __future__ import annotations

import io
import logging

import pytest

from common.batch_timing import BatchTiming
from common.logs import JsonFormatter, TextFormatter

TIMING = BatchTiming(
    size=16,
    completed=14,
    failed=1,
    requeued=1,
    stages={"claim": 0.002, "download": 0.3, "render": 1.5, "kernel_cpu": 1.25, "commit": 0.004},
)


def logged(formatter: logging.Formatter, timing: BatchTiming) -> str:
    """The line the node writes for `timing` (as engine.node logs it) with `formatter`."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("test.batch_timing")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("batch finished %s", timing.encode())
    finally:
        logger.removeHandler(handler)
    return stream.getvalue().strip()


def test_a_record_decodes_to_itself() -> None:
    assert BatchTiming.decode(TIMING.encode()) == TIMING


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_the_record_is_found_in_the_nodes_log_line(formatter: logging.Formatter) -> None:
    line = logged(formatter, TIMING)
    assert BatchTiming.find_in(line) == TIMING


@pytest.mark.parametrize(
    "line",
    [
        "2026-11-28 10:00:00 INFO engine.node worker node: processes=2 prefetch=64",
        "INFO engine.node: batch finished " + TIMING.encode()[:50],  # torn by a crash
        'INFO engine.node: batch finished {"event": "batch_finished", "size": 2}',
        '{"level": "info", "message": "image 1 completed"}',
    ],
    ids=["other line", "torn", "no stages", "other json line"],
)
def test_lines_without_a_whole_record_are_not_records(line: str) -> None:
    assert BatchTiming.find_in(line) is None


def test_decoding_something_else_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        BatchTiming.decode('{"event": "something_else"}')
