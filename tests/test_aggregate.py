"""Tests for pipeline/aggregate.py: per machine, per minute aggregates with late-data recomputation.

Pure: readings in, MinuteRows out; no clock, no I/O.
"""

from __future__ import annotations

import pytest

from pipeline.aggregate import MINUTE_NS, MinuteAggregator, MinuteRow
from pipeline.model import Reading

BASE_MINUTE = 28_333_333  # 2023-11-14T22:13:00Z in minutes since the epoch
BASE_NS = BASE_MINUTE * MINUTE_NS
S = 10**9


def rd(machine: str, minute: int, second: float, load_rate: float, mileage: float, *, seq: int = 0) -> Reading:
    """A reading `second` seconds into minute `minute` after BASE."""
    ts = BASE_NS + minute * MINUTE_NS + int(second * S)
    return Reading(machine=machine, ts_ns=ts, load_rate=load_rate, mileage=mileage, seq=seq, received_ns=ts)


def keys(rows: list[MinuteRow]) -> list[tuple[str, int]]:
    return [(r.machine, (r.minute_ns - BASE_NS) // MINUTE_NS) for r in rows]


def test_count_mean_min_max_last() -> None:
    agg = MinuteAggregator()
    (row,) = agg.add(
        [
            rd("m1", 0, 1, load_rate=10.0, mileage=100.0),
            rd("m1", 0, 20, load_rate=30.0, mileage=120.0),
            rd("m1", 0, 40, load_rate=20.0, mileage=140.0),
            rd("m1", 0, 59.999, load_rate=-5.0, mileage=160.0),  # still minute 0: the minute is [0, 60) s
        ]
    )
    assert row == MinuteRow("m1", BASE_NS, 4, 55.0 / 4, -5.0, 30.0, 160.0)
    assert row.minute_ns % MINUTE_NS == 0  # the key is the start of the minute


def test_last_mileage_is_by_timestamp_not_arrival() -> None:
    """Readings arrive out of order within the minute: 'last' is the newest ts, not the last one added."""
    agg = MinuteAggregator()
    (row,) = agg.add(
        [
            rd("m1", 0, 30, 1.0, mileage=300.0),  # newest
            rd("m1", 0, 10, 2.0, mileage=100.0),
            rd("m1", 0, 20, 3.0, mileage=200.0),
        ]
    )
    assert row.mileage_last == 300.0
    # And across batches: an older reading arriving later does not replace it.
    (row,) = agg.add([rd("m1", 0, 5, 4.0, mileage=50.0)])
    assert (row.count, row.mileage_last, row.load_rate_min, row.load_rate_max) == (4, 300.0, 1.0, 4.0)
    # A newer one does.
    (row,) = agg.add([rd("m1", 0, 45, 0.5, mileage=450.0)])
    assert (row.count, row.mileage_last, row.load_rate_min) == (5, 450.0, 0.5)


def test_first_reading_sets_last_even_when_later_ones_are_older() -> None:
    # Guards the initial state: a lone first reading must be "last" until a newer ts arrives.
    agg = MinuteAggregator()
    (row,) = agg.add([rd("m1", 0, 50, 1.0, mileage=500.0), rd("m1", 0, 0, 1.0, mileage=0.0)])
    assert row.mileage_last == 500.0


def test_batch_returns_only_minutes_it_touched() -> None:
    agg = MinuteAggregator()
    first = agg.add([rd("m1", 0, 1, 1.0, 1.0), rd("m2", 0, 1, 2.0, 2.0), rd("m1", 1, 1, 3.0, 3.0)])
    assert keys(first) == [("m1", 0), ("m2", 0), ("m1", 1)]  # sorted by (minute, machine)
    second = agg.add([rd("m2", 2, 0, 4.0, 4.0)])
    assert keys(second) == [("m2", 2)]  # m1's minutes and m2's minute 0 are unchanged: not returned
    assert agg.add([]) == []


def test_machines_are_kept_apart() -> None:
    agg = MinuteAggregator()
    rows = agg.add([rd("a", 0, 1, 1.0, 10.0), rd("A", 0, 2, 3.0, 30.0), rd("a", 0, 3, 5.0, 50.0)])
    by_machine = {r.machine: r for r in rows}
    assert (by_machine["a"].count, by_machine["a"].load_rate_mean, by_machine["a"].mileage_last) == (2, 3.0, 50.0)
    assert (by_machine["A"].count, by_machine["A"].load_rate_mean) == (1, 3.0)


def test_late_data_recomputes_the_earlier_minute_with_all_its_readings() -> None:
    agg = MinuteAggregator()
    agg.add([rd("m1", 0, 10, 10.0, 100.0), rd("m1", 0, 20, 20.0, 200.0)])
    agg.add([rd("m1", 5, 0, 99.0, 999.0)])  # time moves on to minute 5
    late = agg.add([rd("m1", 0, 30, 60.0, 300.0)])  # late for minute 0
    assert late == [MinuteRow("m1", BASE_NS, 3, 30.0, 10.0, 60.0, 300.0)]  # whole minute, not just the late row


def test_retention_boundary_is_kept_and_beyond_is_counted() -> None:
    agg = MinuteAggregator(retention_minutes=10)
    agg.add([rd("m1", 0, 1, 1.0, 1.0)])
    agg.add([rd("m1", 10, 1, 2.0, 2.0)])  # minute 0 is exactly at the horizon (10 - 10): kept
    (row,) = agg.add([rd("m1", 0, 2, 3.0, 3.0)])
    assert (keys([row]), row.count) == ([("m1", 0)], 2)  # merged with the kept state
    assert agg.late_beyond_retention == 0

    agg.add([rd("m1", 11, 1, 4.0, 4.0)])  # horizon moves to minute 1: minute 0 is evicted
    assert agg.add([rd("m1", 0, 3, 5.0, 5.0), rd("m1", 0, 4, 6.0, 6.0)]) == []
    assert agg.late_beyond_retention == 2
    # Minutes inside retention are unaffected by the eviction.
    (row,) = agg.add([rd("m1", 10, 5, 8.0, 8.0)])
    assert (row.count, row.load_rate_mean) == (2, 5.0)


def test_evicted_minute_is_not_resurrected_as_a_partial_row() -> None:
    """A too-late reading must not create a fresh state whose count would overwrite the full minute downstream."""
    agg = MinuteAggregator(retention_minutes=2)
    agg.add([rd("m1", 0, s, 1.0, 1.0) for s in range(5)])
    agg.add([rd("m1", 3, 0, 1.0, 1.0)])  # horizon 1: minute 0 evicted
    assert agg.add([rd("m1", 0, 59, 1.0, 1.0)]) == []
    assert agg.late_beyond_retention == 1


def test_late_reading_in_the_same_batch_as_newer_minute() -> None:
    # Within one batch the horizon moves as readings are folded in: an old reading after a
    # much newer one is beyond retention; before it, it was still accepted (then evicted).
    agg = MinuteAggregator(retention_minutes=5)
    rows = agg.add([rd("m1", 0, 1, 1.0, 1.0), rd("m1", 100, 1, 2.0, 2.0), rd("m1", 1, 1, 3.0, 3.0)])
    assert keys(rows) == [("m1", 0), ("m1", 100)]
    assert agg.late_beyond_retention == 1
    assert agg.add([rd("m1", 0, 2, 1.0, 1.0)]) == []  # minute 0 was evicted at the end of the batch
    assert agg.late_beyond_retention == 2


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_result_does_not_depend_on_arrival_order(order: str) -> None:
    readings = [rd(f"m{i % 3}", i % 4, i % 60, float(i), float(i * 10), seq=i) for i in range(50)]
    if order == "reversed":
        readings.reverse()
    rows = MinuteAggregator().add(readings)
    expected = MinuteAggregator().add(sorted(readings, key=lambda r: r.ts_ns))
    assert rows == expected
    assert sum(r.count for r in rows) == 50
