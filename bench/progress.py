"""A minimal progress bar on stderr, so long benchmark runs show where they are."""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 30


class ProgressBar:
    """Counts finished steps out of `total` and redraws one status line on `stream`.

    On a terminal the line is redrawn in place; otherwise (logs, CI) a line is printed at most
    every `quiet_interval_s` seconds and at the end, so files stay readable.
    """

    def __init__(
        self, total: int, label: str, stream: TextIO | None = None, quiet_interval_s: float = 5.0
    ) -> None:
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._interactive = self._stream.isatty()
        self._quiet_interval_s = quiet_interval_s
        self._started = time.monotonic()
        self._last_print = 0.0

    def advance(self, steps: int = 1, note: str = "") -> None:
        """Record `steps` more finished steps and redraw."""
        self.done = min(self.done + steps, self.total)
        now = time.monotonic()
        finished = self.done == self.total
        if self._interactive or finished or now - self._last_print >= self._quiet_interval_s:
            self._draw(note, end="" if self._interactive and not finished else "\n")
            self._last_print = now

    def _draw(self, note: str, end: str) -> None:
        filled = int(BAR_WIDTH * self.done / self.total)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        elapsed = time.monotonic() - self._started
        line = f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {note}"
        prefix = "\r\x1b[K" if self._interactive else ""
        self._stream.write(prefix + line + end)
        self._stream.flush()
