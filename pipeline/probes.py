"""Cheap measurement primitives shared by the pipeline and the bench.

:class:`Recorder` feeds an HdrHistogram: recording is a fraction of a
microsecond and memory is bounded by the number of distinct quantised values,
so the pipeline can record every lock acquisition without changing what it
measures. Not thread-safe on its own: record while holding the lock you are
measuring, or own the recorder from one thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hdrh.histogram import HdrHistogram

# Histograms are in microseconds, 1 us to 1 hour, 3 significant digits.
_LOWEST_US, _HIGHEST_US, _DIGITS = 1, 3_600_000_000, 3
# Percentiles of the distribution plots in reports: enough points to draw the tail.
LADDER_PERCENTILES = (0, 10, 25, 50, 75, 90, 95, 99, 99.9, 99.99, 100)


class Recorder:
    """Latency histogram: records nanoseconds, reports milliseconds (HdrHistogram, 3 digits).

    The hot path only quantises the value to the histogram's own precision
    (10 significant bits, finer than 3 decimal digits) and counts it in a dict,
    about 0.2 us; the HdrHistogram is built from those counts when a summary is
    asked for. Recording straight into ``hdrh`` costs about 1 us per value in
    pure Python, which made lock probes several times dearer than the lock.
    """

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self.below_zero = 0
        self.clipped = 0
        self.total_ns = 0
        self._count = 0

    def record_ns(self, value_ns: int) -> None:
        if value_ns < 0:
            # A negative duration means two clocks disagree; count it, never hide it.
            self.below_zero += 1
            value_ns = 0
        self.total_ns += value_ns
        shift = value_ns.bit_length() - 10
        if shift > 0:
            value_ns = value_ns >> shift << shift
        counts = self._counts
        counts[value_ns] = counts.get(value_ns, 0) + 1
        self._count += 1

    def record_all_ns(self, values: Iterable[int]) -> None:
        for v in values:
            self.record_ns(v)

    def merge(self, other: Recorder) -> None:
        for value, count in other._counts.items():
            self._counts[value] = self._counts.get(value, 0) + count
        self.below_zero += other.below_zero
        self.total_ns += other.total_ns
        self._count += other._count

    def to_json(self) -> dict[str, Any]:
        """The raw counts, so a recorder can cross a process boundary and be merged there."""
        return {
            "counts": [[v, c] for v, c in self._counts.items()],
            "below_zero": self.below_zero,
            "total_ns": self.total_ns,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recorder:
        rec = cls()
        for value, count in data["counts"]:
            rec._counts[int(value)] = rec._counts.get(int(value), 0) + int(count)
            rec._count += int(count)
        rec.below_zero = int(data["below_zero"])
        rec.total_ns = int(data["total_ns"])
        return rec

    @property
    def count(self) -> int:
        return self._count

    def histogram(self) -> HdrHistogram:
        """The counts as an HdrHistogram in microseconds (1 us to 1 h)."""
        hist = HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)
        self.clipped = 0
        for value_ns, count in self._counts.items():
            us = value_ns // 1000
            if us > _HIGHEST_US:
                self.clipped += count
                us = _HIGHEST_US
            hist.record_value(max(us, _LOWEST_US), count)
        return hist

    def percentile_ms(self, pct: float) -> float:
        return float(self.histogram().get_value_at_percentile(pct)) / 1000

    def summary(self, ladder: bool = False) -> dict[str, Any]:
        """p50/p90/p99/p99.9/max/mean in ms, count and total; empty -> ``{"count": 0}``.

        With ``ladder``, also ``"ladder": [[percentile, ms], ...]`` at :data:`LADDER_PERCENTILES`, the
        whole distribution in a few points (what a report plots).
        """
        if self._count == 0:
            return {"count": 0}
        hist = self.histogram()
        pct = hist.get_percentile_to_value_dict([50, 90, 99, 99.9])
        out: dict[str, Any] = {
            "p50": pct[50] / 1000,
            "p90": pct[90] / 1000,
            "p99": pct[99] / 1000,
            "p999": pct[99.9] / 1000,
            "max": hist.get_max_value() / 1000,
            "mean": round(hist.get_mean_value() / 1000, 4),
            "count": self._count,
            "total": round(self.total_ns / 1e6, 3),
        }
        if ladder:
            values = hist.get_percentile_to_value_dict([p for p in LADDER_PERCENTILES if 0 < p < 100])
            out["ladder"] = [
                [0, hist.get_min_value() / 1000],
                *([p, values[p] / 1000] for p in LADDER_PERCENTILES if 0 < p < 100),
                [100, hist.get_max_value() / 1000],
            ]
        if self.below_zero:
            out["below_zero"] = self.below_zero
        if self.clipped:
            out["clipped"] = self.clipped
        return out
