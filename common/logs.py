"""Log output: a human format for terminals or one JSON object per line for collectors, both with
credentials (bearer tokens, presigned-URL signatures) masked whatever library logged them, and
neither letting a logged client value (a decoded path, a filename) forge a line of its own."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

REDACTED = "[redacted]"
_SECRETS = (
    # A bearer credential, whatever its format.
    re.compile(r"(?i)(\bbearer\s+)[^\s\"',;]+"),
    # A JWT anywhere: three base64url segments, the first a JSON header ("{" is "ey").
    re.compile(r"()\beyJ[\w-]+\.[\w-]+\.[\w-]*"),
    # The parts of a presigned S3 URL that let its holder read the object.
    re.compile(r"(?i)(\bX-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"'<>]+"),
)


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# What starts each line after an event's first, in text format: an event starts at column 0.
CONTINUATION_INDENT = "  "


def escape_control_characters(text: str) -> str:
    """`text` on one line: every control character written as its escape (`\\r`, `\\x1b`)."""
    return _CONTROL_CHARACTERS.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def _continuation(text: str) -> str:
    """A traceback or stack kept on its own lines, each indented, so none can pass for an event
    (an exception's message may carry client input)."""
    return "\n".join(
        CONTINUATION_INDENT + escape_control_characters(line) for line in text.split("\n")
    )


def redact_secrets(text: str) -> str:
    """`text` with every bearer token, JWT and presigned-URL signature replaced by REDACTED."""
    for pattern in _SECRETS:
        text = pattern.sub(rf"\1{REDACTED}", text)
    return text


class TextFormatter(logging.Formatter):
    """One human-readable line per event, credentials masked and control characters escaped;
    a traceback follows on indented lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(process)d %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        lines = [escape_control_characters(self.formatMessage(record))]
        if record.exc_info:
            lines.append(_continuation(self.formatException(record.exc_info)))
        if record.stack_info:
            lines.append(_continuation(self.formatStack(record.stack_info)))
        return redact_secrets("\n".join(lines))


class JsonFormatter(logging.Formatter):
    """One event per line; extra fields passed with `extra=` (image_id, request_id...) are kept.
    `json.dumps` escapes every control character (and U+2028/U+2029 with `ensure_ascii`)."""

    _RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        event.update({k: v for k, v in vars(record).items() if k not in self._RESERVED})
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return redact_secrets(json.dumps(event, default=str))


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter that would otherwise log URLs (and with them, signatures) at INFO.
    for noisy in ("pika", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
