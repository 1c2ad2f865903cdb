"""Interactive work first inside a node, past the broker and the CPU pool's queue.

An interactive image shares the node's cores with the bulk images moving beside it: their
renders, and the node, database, object store and broker work their claims, downloads, uploads
and commits cause. On a saturated node each of its stages takes two or three times as long as on
an idle one. So while an interactive image is in flight (from its claim to its commit), bulk
images hold before starting any stage (their batch's claim and commit included): what is already
running finishes, nothing new starts, and the interactive image has the machine nearly to itself.

Two bounds keep bulk work moving: one hold lasts at most `longest_hold_seconds`, and bulk work is
held at most `held_share` of the time over any stretch longer than `burst_seconds` (a token
bucket of held time), so a continuous stream of interactive uploads slows a backlog down but
never stops it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

# Longer than an interactive image takes on a busy node (about 0.1 s for a 2 MP photo).
LONGEST_HOLD_SECONDS = 0.25
# Bulk work holds at most half the time, whatever the interactive load; a burst of interactive
# images may hold it for up to a second at once.
HELD_SHARE = 0.5
BURST_SECONDS = 1.0


class InteractiveFirst:
    """Counts interactive images in flight; bulk stages wait for none to be, within bounds."""

    def __init__(
        self,
        longest_hold_seconds: float = LONGEST_HOLD_SECONDS,
        held_share: float = HELD_SHARE,
        burst_seconds: float = BURST_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 < held_share < 1.0:
            raise ValueError(f"held_share must be between 0 and 1, got {held_share}")
        self._changed = threading.Condition()
        self._in_flight = 0
        self._longest_hold = longest_hold_seconds
        self._held_share = held_share
        self._burst = burst_seconds
        self._clock = clock
        # Seconds bulk work may still be held; refills at `held_share` per second, is spent at
        # one per second while bulk work is held.
        self._budget = burst_seconds
        self._settled_at = clock()

    @contextlib.contextmanager
    def interactive(self) -> Iterator[None]:
        """Interactive work is in flight for the duration."""
        with self._changed:
            self._settle()
            self._in_flight += 1
        try:
            yield
        finally:
            with self._changed:
                self._settle()
                self._in_flight -= 1
                if not self._holds():
                    self._changed.notify_all()

    def bulk_turn(self) -> float:
        """Return once bulk work may start its next stage: at once unless an interactive image
        is in flight, else when none is, after the longest hold, or when the budget is spent.
        Returns the seconds it held."""
        with self._changed:
            started = self._settle()
            deadline = started + self._longest_hold
            now = started
            while self._holds() and now < deadline:
                # Until the budget runs out or the deadline, whichever comes first; the exit of
                # the last interactive image in flight wakes it sooner.
                spent_in = self._budget / (1.0 - self._held_share)
                self._changed.wait(timeout=max(0.001, min(deadline - now, spent_in)))
                now = self._settle()
            return now - started

    @property
    def holding_bulk(self) -> bool:
        """Whether bulk stages wait now."""
        with self._changed:
            self._settle()
            return self._holds()

    @property
    def held_budget_seconds(self) -> float:
        """Seconds bulk work may still be held."""
        with self._changed:
            self._settle()
            return self._budget

    def _holds(self) -> bool:
        """Bulk work holds while interactive work is in flight and the budget lasts; once it is
        spent, bulk work goes on, and holding resumes as it refills."""
        return self._in_flight > 0 and self._budget > 0

    def _settle(self) -> float:
        """Account for the time since the last call, and return the time now: the budget
        refills at `held_share` per second, and while bulk work was held it was also spent at
        one per second. Called with the lock held, before any change to what is in flight."""
        now = self._clock()
        elapsed = max(0.0, now - self._settled_at)
        self._settled_at = now
        spent = elapsed if self._holds() else 0.0
        refilled = self._budget + elapsed * self._held_share - spent
        self._budget = max(0.0, min(self._burst, refilled))
        return now
