"""Deadline-bound waiting: every wait in the suite goes through here, never a bare sleep loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """Raised when a condition does not hold before its deadline."""


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 60.0,
    interval: float = 0.5,
    message: str = "condition",
) -> T:
    """Call `predicate` until it returns a truthy value and return that value.

    Exceptions raised by the predicate count as "not yet"; the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    last_value: T | None = None
    while True:
        try:
            last_value = predicate()
            if last_value:
                return last_value
        except Exception as error:
            last_error = error
        if time.monotonic() >= deadline:
            detail = f"; last error: {last_error!r}" if last_error else f"; last value: {last_value!r}"
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {message}{detail}")
        time.sleep(interval)
