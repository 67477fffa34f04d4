"""The slow_sink fault: a fixed delay per flush, or storage a given fraction slower (the gate's injected regression)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench.errors import ScenarioError
from bench.scenario import load_scenario
from pipeline.sinks import SinkTiming, SlowSink


class _TimedSink:
    """A sink whose write takes a known time (busy-waited: the proportion is of the write's wall time)."""

    name = "fake"

    def __init__(self, build_ns: int, write_ns: int, commit_ns: int) -> None:
        self.timing = SinkTiming(build_ns, write_ns, commit_ns, 0, 0)
        self.batches = 0

    def write_batch(self, items: Sequence[int], batch_id: int) -> SinkTiming:
        self.batches += 1
        end = time.perf_counter_ns() + self.timing.build_ns + self.timing.write_ns + self.timing.commit_ns
        while time.perf_counter_ns() < end:
            pass
        return self.timing

    def close(self) -> None:
        pass


def test_a_proportional_slowdown_adds_that_fraction_of_the_flush_as_write_time() -> None:
    inner = _TimedSink(1_000_000, 6_000_000, 3_000_000)  # a 10 ms flush
    timing = SlowSink(inner, 0.0, factor=0.2).write_batch([1, 2], 0)
    added = timing.write_ns - 6_000_000
    # 20% of 10 ms = 2 ms at least; the upper bound only catches a wrong formula (a busy shared machine may
    # delay the wake-up by milliseconds, so no tight bound here).
    assert 2_000_000 <= added < 20_000_000
    assert (timing.build_ns, timing.commit_ns) == (1_000_000, 3_000_000)
    assert inner.batches == 1


def test_a_fixed_delay_and_a_factor_add_up() -> None:
    timing = SlowSink(_TimedSink(0, 10_000_000, 0), 0.005, factor=0.1).write_batch([1], 0)
    assert 6_000_000 <= timing.write_ns - 10_000_000 < 30_000_000


def test_a_slow_sink_without_any_slowdown_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nphases: [{kind: steady, rate: 10, duration: 1s}]\nfaults: [{kind: slow_sink}]\n")
    with pytest.raises(ScenarioError, match=r"s\.yaml: faults\[0\]\.slow_sink: expected delay .* or factor"):
        load_scenario(path)


def test_scenario_sums_the_slowdowns(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\nphases: [{kind: steady, rate: 10, duration: 1s}]\n"
        "faults: [{kind: slow_sink, factor: 0.1}, {kind: slow_sink, delay: 20ms}]\n"
    )
    sc = load_scenario(path).scenario
    assert sc.sink_slowdown() == pytest.approx(0.1)
    assert sc.sink_delay_s() == pytest.approx(0.02)
