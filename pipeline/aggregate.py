"""Per machine, per minute aggregation. Pure: no I/O, no clock.

For each (machine, minute) it keeps count, sum/min/max of ``load_rate`` and
the ``mileage`` of the latest reading. A batch returns the recomputed rows of
exactly the minutes it touched, so late data for a minute already written
produces that minute again (to be upserted), and nothing else is recomputed:
per-minute aggregates are independent, so "from the earliest changed minute"
reduces to "the changed minutes".

State older than ``retention_minutes`` behind the newest minute seen is
evicted to bound memory; a reading later than that cannot be merged and is
counted in ``late_beyond_retention`` (it is still in the raw Parquet data).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.model import Reading

MINUTE_NS = 60 * 10**9


@dataclass(frozen=True, slots=True)
class MinuteRow:
    machine: str
    minute_ns: int
    count: int
    load_rate_mean: float
    load_rate_min: float
    load_rate_max: float
    mileage_last: float


@dataclass(slots=True)
class _State:
    count: int
    total: float
    low: float
    high: float
    last_ts: int
    last_mileage: float


class MinuteAggregator:
    """Incremental per-minute aggregates with late-data recomputation."""

    def __init__(self, retention_minutes: int = 120) -> None:
        self._state: dict[tuple[str, int], _State] = {}
        self._retention = retention_minutes
        self._newest_minute: int | None = None
        self.late_beyond_retention = 0

    def add(self, readings: Iterable[Reading]) -> list[MinuteRow]:
        """Fold ``readings`` in; return the full aggregate of every minute they changed."""
        changed: set[tuple[str, int]] = set()
        for r in readings:
            minute = r.ts_ns // MINUTE_NS
            if self._newest_minute is not None and minute < self._newest_minute - self._retention:
                self.late_beyond_retention += 1
                continue
            key = (r.machine, minute)
            st = self._state.get(key)
            if st is None:
                self._state[key] = _State(1, r.load_rate, r.load_rate, r.load_rate, r.ts_ns, r.mileage)
            else:
                st.count += 1
                st.total += r.load_rate
                st.low = min(st.low, r.load_rate)
                st.high = max(st.high, r.load_rate)
                if r.ts_ns >= st.last_ts:
                    st.last_ts, st.last_mileage = r.ts_ns, r.mileage
            changed.add(key)
            if self._newest_minute is None or minute > self._newest_minute:
                self._newest_minute = minute
        rows = [self._row(key) for key in sorted(changed, key=lambda k: (k[1], k[0]))]
        self._evict()
        return rows

    def _row(self, key: tuple[str, int]) -> MinuteRow:
        st = self._state[key]
        return MinuteRow(key[0], key[1] * MINUTE_NS, st.count, st.total / st.count, st.low, st.high, st.last_mileage)

    def _evict(self) -> None:
        if self._newest_minute is None:
            return
        horizon = self._newest_minute - self._retention
        for key in [k for k in self._state if k[1] < horizon]:
            del self._state[key]
