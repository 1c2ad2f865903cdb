"""The worker node's local health record: written by the node, read by `python -m ops node-check`.

A small JSON file (WORKER_HEALTH_FILE), rewritten every control tick, that says whether the node
is getting its work done: how many images it holds, since when it has made no progress (a render
or a commit finished) while holding them, and why it is paused, if it is. It lives on the node's
own disk, not in Redis, so the liveness probe judges the work and not an optional cache.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# A record older than this means the control loop itself is stuck (it writes every 2 s).
STALE_AFTER_SECONDS = 30.0
# Beyond MAX_RENDER_SECONDS, how long a node holding work may go without progress: downloads,
# uploads and commits between two renders.
STALL_MARGIN_SECONDS = 30.0


class HealthRecordUnreadable(Exception):
    """No record at the path, or one that is not a health record; str(exc) says which."""


@dataclass(frozen=True)
class HealthRecord:
    pid: int
    written_at: float  # epoch seconds
    holding: int  # images in the batches the node is processing
    # Epoch seconds of the last progress, or of taking work while idle, whichever is later.
    progress_at: float
    max_render_seconds: float
    paused: str | None = None  # why the node waits on purpose (a dependency outage), if it does

    def problem(
        self,
        now: float,
        margin_seconds: float = STALL_MARGIN_SECONDS,
        stale_after_seconds: float = STALE_AFTER_SECONDS,
    ) -> str | None:
        """Why this node is not alive, or None when it is: a stale record, or work held
        without progress for longer than a render may take plus `margin_seconds`. A paused node
        waits on purpose and is alive."""
        age = now - self.written_at
        if age > stale_after_seconds:
            return (
                f"its health record was last written {age:.0f} s ago "
                "(the node is gone, or its control loop is stuck)"
            )
        if self.paused is not None or self.holding == 0:
            return None
        stalled = now - self.progress_at
        if stalled > self.max_render_seconds + margin_seconds:
            return (
                f"it holds {self.holding} images and made no progress for {stalled:.0f} s "
                f"(a render may take {self.max_render_seconds:g} s)"
            )
        return None

    def describe(self, now: float) -> str:
        state = f"paused ({self.paused})" if self.paused else f"holding {self.holding} images"
        return (
            f"pid {self.pid} {state}, last progress {now - self.progress_at:.0f} s ago, "
            f"record written {now - self.written_at:.0f} s ago"
        )


def write_health_record(path: Path, record: HealthRecord) -> None:
    """Replace the record at `path` atomically: a reader sees the old record or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(asdict(record), out)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_health_record(path: Path) -> HealthRecord:
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
        return HealthRecord(**fields)
    except FileNotFoundError:
        raise HealthRecordUnreadable(f"no health record at {path} (is a node running?)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise HealthRecordUnreadable(f"{path} is not a health record ({exc})") from None
