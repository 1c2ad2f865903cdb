"""A client value that reaches the log (here the decoded request path, logged by the API's error
handlers) cannot forge a log line: in text format control characters are escaped and a
traceback's lines are indented; in JSON format each event stays one parseable object."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator

import falcon
import falcon.testing

from common.errors import DependencyUnavailable
from common.logs import JsonFormatter, TextFormatter
from ingest.errors import handle_pixelmill_error, handle_unexpected

FORGED = "2026-01-01 00:00:00,000 ERROR   1 ingest.auth: admin token accepted for root"
# What a client sends: the forged line after an encoded CR LF, and a terminal escape.
HOSTILE_PATH = "/api/v1/images/x%0d%0a" + FORGED.replace(" ", "%20") + "%1b%5b2J%e2%80%a8end"


@contextlib.contextmanager
def captured(logger_name: str, formatter: logging.Formatter) -> Iterator[io.StringIO]:
    """What one logger writes, through `formatter`, into a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def refuse_as_unavailable(path: str) -> None:
    """The API's own handler for a 503, on a request for `path`: it logs the decoded path."""
    req = falcon.testing.create_req(path=path)
    assert "\r\n" in req.path, "the test must send a decoded CR LF to the log"
    handle_pixelmill_error(req, falcon.Response(), DependencyUnavailable("database"), {})


def fail_unexpectedly(path: str) -> None:
    """The API's handler for an unexpected error whose message repeats the client's path."""
    req = falcon.testing.create_req(path=path)
    try:
        raise RuntimeError(f"cannot route {req.path}")
    except RuntimeError as exc:
        handle_unexpected(req, falcon.Response(), exc, {})


def test_crlf_in_a_logged_path_cannot_forge_a_text_log_line() -> None:
    with captured("ingest.errors", TextFormatter()) as stream:
        refuse_as_unavailable(HOSTILE_PATH)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    [line] = lines
    assert "database unavailable" in line
    assert "x\\r\\n2026-01-01 00:00:00,000 ERROR" in line, "the value is kept, escaped"
    assert "\\x1b[2J" in line and "\\u2028end" in line
    assert "\x1b" not in line and "\u2028" not in line and "\r" not in line


def test_crlf_in_an_exception_message_stays_inside_the_indented_traceback() -> None:
    with captured("ingest.errors", TextFormatter()) as stream:
        fail_unexpectedly(HOSTILE_PATH)
    text = stream.getvalue()
    lines = text.rstrip("\n").split("\n")
    events = [line for line in lines if not line.startswith("  ")]
    assert len(events) == 1, events
    assert "unhandled error on GET" in events[0]
    assert any("Traceback (most recent call last)" in line for line in lines[1:])
    assert not any(line.startswith(FORGED) for line in lines)
    assert "\r" not in text and "\x1b" not in text


def test_json_log_keeps_a_hostile_path_inside_one_event() -> None:
    with captured("ingest.errors", JsonFormatter()) as stream:
        refuse_as_unavailable(HOSTILE_PATH)
        fail_unexpectedly(HOSTILE_PATH)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    events = [json.loads(line) for line in lines]
    assert "\r\n" + FORGED in events[0]["message"], "JSON carries the exact value, escaped"
    assert "\r\n" + FORGED in events[1]["exception"]
    assert "\u2028" not in stream.getvalue(), "a raw U+2028 breaks some line-based readers"
