"""The record a worker node logs once per batch, and the benchmark reads back: what became of the
batch's messages and the seconds it spent per stage, as one JSON event inside the log line."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

EVENT = "batch_finished"
# How the event starts in a log line, whichever log format (text or JSON) carries it.
_MARKER = '{"event": "' + EVENT + '"'


@dataclass(frozen=True)
class BatchTiming:
    """One batch: its size in messages, their fates, and seconds per stage (claim and commit
    once per batch; download, render, kernel_cpu and upload summed over its images)."""

    size: int
    completed: int = 0
    failed: int = 0
    requeued: int = 0
    stages: Mapping[str, float] = field(default_factory=dict)

    def encode(self) -> str:
        """One line of JSON, starting with the event's name."""
        fields = asdict(self)
        fields["stages"] = {stage: round(s, 6) for stage, s in self.stages.items()}
        return json.dumps({"event": EVENT, **fields})

    @classmethod
    def decode(cls, text: str) -> BatchTiming:
        """The record `encode` wrote; ValueError if `text` is not one."""
        return cls._from_fields(json.loads(text))

    @classmethod
    def find_in(cls, line: str) -> BatchTiming | None:
        """The record carried by one log line, or None for any other line or a torn record."""
        start = line.find(_MARKER)
        if start < 0:
            start = line.find(json.dumps(_MARKER)[1:-1])  # escaped inside a JSON log line
            if start < 0:
                return None
            return cls._from_json_log(line)
        try:
            fields, _ = json.JSONDecoder().raw_decode(line, start)
            return cls._from_fields(fields)
        except ValueError:
            return None

    @classmethod
    def _from_json_log(cls, line: str) -> BatchTiming | None:
        try:
            message = json.loads(line)["message"]
            return cls.find_in(message[message.index(_MARKER) :])
        except (ValueError, KeyError, TypeError):
            return None

    @classmethod
    def _from_fields(cls, fields: Any) -> BatchTiming:
        if not isinstance(fields, dict) or fields.get("event") != EVENT:
            raise ValueError("not a batch timing record")
        stages = fields.get("stages")
        if not isinstance(stages, dict):
            raise ValueError("a batch timing record needs its stages")
        try:
            return cls(
                size=int(fields["size"]),
                completed=int(fields["completed"]),
                failed=int(fields["failed"]),
                requeued=int(fields["requeued"]),
                stages={str(k): float(v) for k, v in stages.items()},
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed batch timing record: {exc}") from exc
