"""Cheap measurement primitives shared by the pipeline and the bench.

:class:`Recorder` feeds an HdrHistogram: recording is a fraction of a
microsecond and memory is bounded by the number of distinct quantised values,
so the pipeline can record every lock acquisition without changing what it
measures. Not thread-safe on its own: record while holding the lock you are
measuring, or own the recorder from one thread.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from hdrh.histogram import HdrHistogram

# Histograms are in microseconds, 1 us to 1 hour, 3 significant digits.
_LOWEST_US, _HIGHEST_US, _DIGITS = 1, 3_600_000_000, 3
# Percentiles of the distribution plots in reports: enough points to draw the tail.
LADDER_PERCENTILES = (0, 10, 25, 50, 75, 90, 95, 99, 99.9, 99.99, 100)
_EXACT_FLOAT = 2**53


class Recorder:
    """Latency histogram: records nanoseconds, reports milliseconds (HdrHistogram, 3 digits).

    The hot path only quantises the value to the histogram's own precision
    (10 significant bits, finer than 3 decimal digits) and counts it in a dict,
    about 0.2 us; the HdrHistogram is built from those counts when a summary is
    asked for. Recording straight into ``hdrh`` costs about 1 us per value in
    pure Python, which made lock probes several times dearer than the lock.
    """

    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()
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

    def record_array_ns(self, values: npt.NDArray[np.int64]) -> None:
        """Record many values at once, exactly as :meth:`record_ns` one by one would, vectorised (about 0.03 us
        a value instead of 0.3): for producers that collect raw durations in a list and fold them in bulk."""
        if values.size == 0:
            return
        negative = values < 0
        if negative.any():
            self.below_zero += int(negative.sum())
            values = np.where(negative, 0, values)
        big = values >= _EXACT_FLOAT
        if big.any():
            # frexp's exponent is the bit length only while the float is exact; beyond 2**53 ns (104 days)
            # the scalar path quantises (rare: a duration that long is a clock fault).
            for v in values[big].tolist():
                self.record_ns(v)
            values = values[~big]
        if values.size == 0:
            return
        # numpy's sum wraps around at 2**63: summed as Python ints when it could.
        safe = int(values.max()) * values.size < 2**63
        self.total_ns += int(values.sum()) if safe else sum(values.tolist())
        # bit_length() of a positive integer below 2**53 is frexp's exponent; 0 -> exponent 0, no shift.
        shift = np.maximum(np.frexp(values.astype(np.float64))[1] - 10, 0)
        # A quantised value is its top 10 bits and a shift: one small integer (shift * 1024 + top bits), so
        # np.bincount counts them all at once and the dict is touched once per distinct value, not per value.
        bins = np.bincount((shift << 10) | (values >> shift))
        present = np.flatnonzero(bins)
        table = self._counts
        for index, count in zip(present.tolist(), bins[present].tolist(), strict=True):
            value = (index & 1023) << (index >> 10)
            table[value] = table.get(value, 0) + count
        self._count += int(values.size)

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

    def percentile_ns(self, pct: float) -> int | None:
        """The value at ``pct`` from the recorded counts themselves, at their 10-bit precision (0.1%), not the
        histogram's microseconds: for short durations (a message's CPU time, ~10 us) whole microseconds are too
        coarse to see a 10% change."""
        if self._count == 0:
            return None
        rank = max(1, math.ceil(pct / 100 * self._count))
        seen = 0
        for value in sorted(self._counts):
            seen += self._counts[value]
            if seen >= rank:
                return value
        return max(self._counts)

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
            # Exact, from the running total: HdrHistogram's get_mean_value walks every bucket (about 30 ms a
            # call on a lock histogram), which made summaries the bulk of a short run's CPU.
            "mean": round(self.total_ns / self._count / 1e6, 4),
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


@dataclass(frozen=True, slots=True)
class CpuStatistics:
    """A snapshot of a :class:`CpuSampler`: thread CPU time of the sampled calls after the warm-up."""

    samples: int
    cpu_ns: int
    p50_ns: int | None
    every: int
    warmup_samples: int

    @property
    def mean_us(self) -> float | None:
        return self.cpu_ns / self.samples / 1000 if self.samples else None

    @property
    def p50_us(self) -> float | None:
        return None if self.p50_ns is None else self.p50_ns / 1000


class Tally:
    """A count that any number of threads bump without a lock, for a path taken once per message.

    :attr:`bump` is ``next`` of an :class:`itertools.count`, one C call under the GIL, so two threads never lose
    a step (``n += 1`` under a lock cost about 0.3 us a message). :meth:`value` reads the count with one more
    ``next``, and keeps its own steps apart.

    >>> t = Tally()
    >>> for _ in range(3):
    ...     _ = t.bump()
    >>> t.value(), t.value()
    (3, 3)
    """

    def __init__(self) -> None:
        self._count = itertools.count()
        self.bump = self._count.__next__
        self._reads = 0
        self._lock = threading.Lock()

    def value(self) -> int:
        with self._lock:
            n = next(self._count) - self._reads
            self._reads += 1
        return n


class CpuSampler:
    """Thread CPU time (``time.thread_time_ns``) of one call in every ``every``, after ``warmup`` samples.

    Why sampled: reading a thread's CPU clock is a system call, about 0.7 us here, and a message's decode +
    validate + put is about 14 us; timing every call would add 10% to what it measures. One in eight adds
    about 1%. The same stream gives the same sampled calls in every run, so two runs compare like with like.
    Why CPU time: a neighbour on the cores doubles wall times but barely moves a thread's own CPU time.
    Why the median is the figure to judge: a few calls in a thousand take 3-10x longer (a garbage collection,
    a put that blocks and switches threads) and move the mean by 10% from run to run; the median moved 1-2%.

    >>> s = CpuSampler(every=2, warmup=0)
    >>> [s.due() for _ in range(4)]
    [True, False, True, False]
    """

    def __init__(self, every: int = 8, warmup: int = 64) -> None:
        if every < 1 or warmup < 0:
            raise ValueError(f"every must be >= 1 and warmup >= 0, got {every}, {warmup}")
        self.every = every
        self.warmup = warmup
        self._lock = threading.Lock()
        # next() on itertools.count is one C call under the GIL: atomic across threads without a lock, which
        # matters on a path taken for every message.
        self._calls = itertools.count()
        self._seen = 0
        self._recorder = Recorder()

    def due(self) -> bool:
        """Count one call; True when this one is to be timed (then :meth:`add` its CPU time)."""
        return next(self._calls) % self.every == 0

    @staticmethod
    def now_ns() -> int:
        return time.thread_time_ns()

    def add(self, cpu_ns: int) -> None:
        with self._lock:
            self._seen += 1
            if self._seen > self.warmup:  # the first calls fill caches and per-machine state: not steady state
                self._recorder.record_ns(cpu_ns)

    def statistics(self) -> CpuStatistics:
        with self._lock:
            rec = self._recorder
            return CpuStatistics(
                rec.count, rec.total_ns, rec.percentile_ns(50), self.every, min(self._seen, self.warmup)
            )
