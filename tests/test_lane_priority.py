"""Interactive work first inside a node: bulk stages hold while an interactive image is in
flight, never longer than the longest hold, and never more than their share of the time."""

from __future__ import annotations

import threading

import pytest

from engine.lane_priority import InteractiveFirst


class BulkTurn:
    """One bulk turn taken on a thread of its own: `returned` is set once it returned, with
    the seconds it held in `held`."""

    def __init__(self, priority: InteractiveFirst) -> None:
        self.returned = threading.Event()
        self.held = -1.0
        self.thread = threading.Thread(target=self._take, args=(priority,), daemon=True)
        self.thread.start()

    def _take(self, priority: InteractiveFirst) -> None:
        self.held = priority.bulk_turn()
        self.returned.set()


def test_a_bulk_stage_goes_at_once_when_no_interactive_image_is_in_flight() -> None:
    turn = BulkTurn(InteractiveFirst(longest_hold_seconds=3600))
    turn.thread.join(timeout=30)
    assert turn.returned.is_set()
    assert turn.held == 0.0


def test_a_bulk_stage_holds_until_the_interactive_images_in_flight_are_done() -> None:
    priority = InteractiveFirst(longest_hold_seconds=3600, burst_seconds=3600)
    with priority.interactive():
        with priority.interactive():
            turn = BulkTurn(priority)
            assert not turn.returned.wait(0.3)
        assert not turn.returned.wait(0.3)  # one interactive image is still in flight
    turn.thread.join(timeout=30)
    assert turn.returned.is_set()
    assert turn.held > 0.0


def test_a_bulk_stage_holds_no_longer_than_the_longest_hold() -> None:
    priority = InteractiveFirst(longest_hold_seconds=0.05)
    with priority.interactive():
        turn = BulkTurn(priority)
        turn.thread.join(timeout=30)
        assert turn.returned.is_set()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_stream_of_interactive_work_holds_bulk_work_at_most_its_share_of_the_time() -> None:
    clock = FakeClock()
    priority = InteractiveFirst(
        longest_hold_seconds=3600, held_share=0.5, burst_seconds=1.0, clock=clock
    )
    held_steps, steps = 0, 10_000
    with priority.interactive():  # interactive work in flight for the whole stretch
        for _ in range(steps):
            clock.now += 0.01
            held_steps += priority.holding_bulk
    # 100 s: at most half of it held, plus the one-second burst the budget starts with.
    assert held_steps * 0.01 <= 0.5 * 100 + 1.0
    assert held_steps * 0.01 >= 0.5 * 100 - 1.0  # and interactive work keeps its share


def test_the_held_time_budget_refills_while_no_interactive_work_is_in_flight() -> None:
    clock = FakeClock()
    priority = InteractiveFirst(held_share=0.5, burst_seconds=1.0, clock=clock)
    with priority.interactive():
        clock.now += 2.0  # spent at one per second, refilled at a half: 1.0 - 2.0 + 1.0
        assert priority.held_budget_seconds == 0.0
        assert not priority.holding_bulk
    clock.now += 1.0
    assert priority.held_budget_seconds == 0.5
    clock.now += 10.0
    assert priority.held_budget_seconds == 1.0  # never more than the burst


def test_a_bulk_stage_goes_on_once_the_held_time_budget_is_spent() -> None:
    priority = InteractiveFirst(longest_hold_seconds=3600, held_share=0.5, burst_seconds=0.2)
    with priority.interactive():
        turn = BulkTurn(priority)
        turn.thread.join(timeout=30)  # the budget lasts 0.4 s of holding
        assert turn.returned.is_set()
        assert turn.held > 0.0
        assert priority.held_budget_seconds < 0.2


def test_a_held_share_outside_zero_to_one_is_refused() -> None:
    for share in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="held_share"):
            InteractiveFirst(held_share=share)
