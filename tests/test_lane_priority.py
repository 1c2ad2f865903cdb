"""Interactive work first inside a node: bulk renders hold while an interactive image is in
flight, and never longer than the longest hold."""

from __future__ import annotations

import threading

from engine.lane_priority import InteractiveFirst


def bulk_turn_in_background(priority: InteractiveFirst) -> tuple[threading.Thread, threading.Event]:
    returned = threading.Event()

    def take_turn() -> None:
        priority.bulk_turn()
        returned.set()

    thread = threading.Thread(target=take_turn, daemon=True)
    thread.start()
    return thread, returned


def test_a_bulk_render_goes_at_once_when_no_interactive_image_is_in_flight() -> None:
    thread, returned = bulk_turn_in_background(InteractiveFirst(longest_hold_seconds=3600))
    thread.join(timeout=30)
    assert returned.is_set()


def test_a_bulk_render_holds_until_the_interactive_images_in_flight_are_done() -> None:
    priority = InteractiveFirst(longest_hold_seconds=3600)
    with priority.interactive():
        with priority.interactive():
            thread, returned = bulk_turn_in_background(priority)
            assert not returned.wait(0.3)
        assert not returned.wait(0.3)  # one interactive image is still in flight
    thread.join(timeout=30)
    assert returned.is_set()


def test_a_bulk_render_holds_no_longer_than_the_longest_hold() -> None:
    priority = InteractiveFirst(longest_hold_seconds=0.05)
    with priority.interactive():
        thread, returned = bulk_turn_in_background(priority)
        thread.join(timeout=30)
        assert returned.is_set()
