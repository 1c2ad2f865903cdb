"""Waiting for a condition with a deadline: the one polling loop that tests, benchmarks and
operator tools share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 60.0,
    interval: float = 0.1,
    what: str | Callable[[], str] = "the condition",
) -> T:
    """Call `predicate` every `interval` seconds until it returns something truthy, and return
    that; raise TimeoutError after `timeout` seconds. `what` names the awaited condition in the
    error; a callable is asked only then, so it can describe the state at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise TimeoutError(f"gave up waiting for {described} after {timeout:g} s")
        time.sleep(interval)
