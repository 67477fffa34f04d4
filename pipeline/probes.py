"""Cheap measurement primitives shared by the pipeline and the bench.

:class:`Recorder` wraps an HdrHistogram: recording is a few hundred
nanoseconds and memory is fixed whatever the count, so the pipeline can record
every lock acquisition without changing what it measures. Not thread-safe on
its own: record while holding the lock you are measuring, or own the recorder
from one thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hdrh.histogram import HdrHistogram

# Recorded in microseconds, 1 us to 1 hour, 3 significant digits.
_LOWEST_US, _HIGHEST_US, _DIGITS = 1, 3_600_000_000, 3


class Recorder:
    """An HdrHistogram in microseconds that reports milliseconds."""

    def __init__(self) -> None:
        self._h = HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)
        self.below_zero = 0
        self.clipped = 0
        self.total_ns = 0

    def record_ns(self, value_ns: int) -> None:
        us = value_ns // 1000
        if us < 0:
            # A negative duration means two clocks disagree; count it, never hide it.
            self.below_zero += 1
            us = 0
        if us > _HIGHEST_US:
            self.clipped += 1
            us = _HIGHEST_US
        self.total_ns += max(value_ns, 0)
        self._h.record_value(max(us, _LOWEST_US))

    def record_all_ns(self, values: Iterable[int]) -> None:
        for v in values:
            self.record_ns(v)

    def merge(self, other: Recorder) -> None:
        self._h.add(other._h)
        self.below_zero += other.below_zero
        self.clipped += other.clipped
        self.total_ns += other.total_ns

    @property
    def count(self) -> int:
        return int(self._h.get_total_count())

    def percentile_ms(self, pct: float) -> float:
        return float(self._h.get_value_at_percentile(pct)) / 1000

    def summary(self) -> dict[str, Any]:
        """p50/p90/p99/p99.9/max/mean in ms, count and total; empty -> ``{"count": 0}``."""
        if self.count == 0:
            return {"count": 0}
        pct = self._h.get_percentile_to_value_dict([50, 90, 99, 99.9])
        out: dict[str, Any] = {
            "p50": pct[50] / 1000,
            "p90": pct[90] / 1000,
            "p99": pct[99] / 1000,
            "p999": pct[99.9] / 1000,
            "max": self._h.get_max_value() / 1000,
            "mean": round(self._h.get_mean_value() / 1000, 4),
            "count": self.count,
            "total": round(self.total_ns / 1e6, 3),
        }
        if self.below_zero:
            out["below_zero"] = self.below_zero
        if self.clipped:
            out["clipped"] = self.clipped
        return out
