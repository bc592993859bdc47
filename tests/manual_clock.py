"""A clock the test moves by hand, for code that takes its clock as an argument."""

from __future__ import annotations


class Clock:
    """Monotonic seconds moved by hand (`clock.now += 0.1`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
