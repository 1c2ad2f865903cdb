"""Interactive work first inside a node, past the CPU pool's queue.

An interactive image shares the node's cores with the bulk renders running beside it, and with
the storage and database work they cause: on a saturated node its render and stages take two
or three times as long as on an idle one. While an interactive image is in flight (from its
claim to its commit), bulk images hold before starting a render, for at most
`longest_hold_seconds` each, so a slow interactive image never stalls bulk work for long and
a stream of them leaves bulk work its turns.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

# Longer than an interactive image takes on a busy node (about 0.1 s for a 2 MP photo).
LONGEST_HOLD_SECONDS = 0.25


class InteractiveFirst:
    """Counts interactive images in flight; bulk renders wait for none to be."""

    def __init__(self, longest_hold_seconds: float = LONGEST_HOLD_SECONDS) -> None:
        self._changed = threading.Condition()
        self._in_flight = 0
        self._longest_hold = longest_hold_seconds

    @contextlib.contextmanager
    def interactive(self) -> Iterator[None]:
        """Interactive work is in flight for the duration."""
        with self._changed:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._changed:
                self._in_flight -= 1
                if not self._in_flight:
                    self._changed.notify_all()

    def bulk_turn(self) -> None:
        """Return once no interactive image is in flight, or after the longest hold."""
        with self._changed:
            self._changed.wait_for(lambda: not self._in_flight, timeout=self._longest_hold)
