"""Time, injected.

Logic never calls ``time.time()`` itself: it is handed a :class:`Clock`, so tests
drive a 60 s timeout trigger with a :class:`FakeClock` in microseconds, and the
bench measures latency and triggers flushes on one shared timeline.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """A source of time in integer nanoseconds since the Unix epoch."""

    def now_ns(self) -> int: ...


class MonotonicWallClock:
    """Wall-clock nanoseconds that never go backwards.

    Anchored once to ``time.time_ns()`` and advanced by ``time.monotonic_ns()``:
    an NTP step during a run must not produce negative latencies, yet the values
    still read as real UTC instants in the output.
    """

    def __init__(self) -> None:
        self._wall0 = time.time_ns()
        self._mono0 = time.monotonic_ns()

    def now_ns(self) -> int:
        return self._wall0 + (time.monotonic_ns() - self._mono0)


class FakeClock:
    """A clock that only moves when told to; thread-safe."""

    def __init__(self, start_ns: int = 1_700_000_000_000_000_000) -> None:
        self._now = start_ns
        self._lock = threading.Lock()

    def now_ns(self) -> int:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += int(seconds * 1e9)
