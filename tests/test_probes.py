"""The probes' arithmetic: histogram precision, append-cost fit, queue-depth summary."""

from __future__ import annotations

import random

import pytest
from hdrh.histogram import HdrHistogram

from bench.probes import append_cost, series_summary
from pipeline.model import FlushStat, TriggerKind
from pipeline.probes import Recorder


def test_recorder_matches_a_direct_hdr_histogram_within_its_precision() -> None:
    """Pre-quantising must not cost precision: percentiles agree with hdrh fed directly to 0.2%."""
    rng = random.Random(7)
    values = [int(rng.lognormvariate(13, 1.5)) for _ in range(50_000)]  # ns, ~0.4 ms median, long tail
    rec = Recorder()
    direct = HdrHistogram(1, 3_600_000_000, 3)
    for v in values:
        rec.record_ns(v)
        direct.record_value(max(v // 1000, 1))
    ours = rec.histogram()
    for pct in (50, 90, 99, 99.9, 100):
        a, b = ours.get_value_at_percentile(pct), direct.get_value_at_percentile(pct)
        assert a == pytest.approx(b, rel=0.002, abs=1), pct
    assert rec.count == len(values)
    assert rec.summary()["total"] == pytest.approx(sum(values) / 1e6, abs=0.001)  # reported to the microsecond


def test_recorder_counts_negative_and_merges() -> None:
    a, b = Recorder(), Recorder()
    a.record_ns(-5)
    a.record_ns(2_000_000)
    b.record_ns(4_000_000)
    a.merge(b)
    summary = a.summary()
    assert summary["count"] == 3
    assert summary["below_zero"] == 1
    assert summary["max"] == pytest.approx(4.0, rel=0.002)
    assert Recorder().summary() == {"count": 0}


def _flush(batch: int, mb: float, ms: float, trigger: TriggerKind = "size") -> FlushStat:
    return FlushStat(
        sink="parquet",
        batch_id=batch,
        trigger=trigger,
        rows=100,
        started_ns=0,
        build_ns=0,
        write_ns=int(ms * 1e6),
        commit_ns=0,
        durable_ns=0,
        bytes_before=int(mb * 1e6),
        rows_before=batch * 100,
    )


def test_append_cost_fit_recovers_a_known_line() -> None:
    # cost = 10 ms + 4 ms per MB already in the file, 20 flushes of 1 MB each.
    flushes = [_flush(i, float(i), 10 + 4 * i) for i in range(20)]
    out = append_cost(flushes)
    assert out["slope_ms_per_mb"] == pytest.approx(4.0, rel=1e-6)
    assert out["intercept_ms"] == pytest.approx(10.0, rel=1e-6)
    assert out["first_ms"] == pytest.approx(10 + 4 * 2)  # median of flushes 0..4
    assert out["last_ms"] == pytest.approx(10 + 4 * 17)  # median of flushes 15..19
    assert out["fit_last_over_first"] == pytest.approx((10 + 4 * 19) / 10)
    assert len(out["points"]) == 20


def test_append_cost_ignores_a_small_shutdown_flush_for_first_and_last() -> None:
    flushes = [_flush(i, float(i), 20.0) for i in range(10)] + [_flush(10, 10.0, 1.0, "shutdown")]
    out = append_cost(flushes)
    assert out["last_ms"] == 20.0
    assert out["last_over_first"] == 1.0


def test_series_summary() -> None:
    samples = [(i / 10, i % 7, 100 - i) for i in range(100)]
    out = series_summary(samples)
    assert out["depth_max"] == 6
    assert out["backlog_max"] == 100
    assert out["count"] == 100
    assert series_summary([]) == {"count": 0}


def test_append_cost_leaves_out_the_build_step() -> None:
    """Building the batch does not depend on the file; only write + commit count."""
    flushes = [
        FlushStat(
            sink="parquet",
            batch_id=i,
            trigger="size",
            rows=10,
            started_ns=0,
            build_ns=50_000_000,
            write_ns=2_000_000,
            commit_ns=1_000_000,
            durable_ns=0,
            bytes_before=i * 1_000_000,
            rows_before=i * 10,
        )
        for i in range(10)
    ]
    out = append_cost(flushes)
    assert out["first_ms"] == out["last_ms"] == 3.0
    assert out["points"][0][2:] == [3.0, "size", 53.0]
