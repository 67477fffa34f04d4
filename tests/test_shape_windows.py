"""The windows shape: both engines equal a brute-force oracle, the buffer counts every drop by policy, the
harness's comparison catches a wrong value, memory grows as documented, and bad intervals are refused.

Everything here is deterministic (virtual clock, seeded stream, hypothesis with its default database off the
wall clock): no assert reads a wall-clock or CPU time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.errors import ScenarioError
from bench.harness.runner import RunOptions, run
from bench.scenario import load_scenario
from bench.shapes.windows import Arrival, compare, drive, measure, oracle, through_buffer
from bench.shapes.windows_settings import WindowsSettings
from pipeline.windows import WindowConfig, make_engine, run_all
from simulators.stream import PhaseSpec, StreamSpec

S = 1_000_000_000

reading = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    st.integers(0, 40 * 10).map(lambda tenths: tenths * S // 10),  # event times on a 0.1 s grid, 0-40 s
    st.integers(0, 100_000).map(lambda milli: milli / 1000),  # values as the stream sends them: 3 decimals
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    readings=st.lists(reading, max_size=120),
    windows=st.lists(st.sampled_from([1, 2, 3, 5, 10]), min_size=1, max_size=3, unique=True),
    slide=st.sampled_from([1]),
    lateness_s=st.integers(0, 6),
    strategy=st.sampled_from(["naive", "improved"]),
)
def test_engines_equal_the_brute_force_oracle(
    readings: list[tuple[str, int, float]], windows: list[int], slide: int, lateness_s: int, strategy: str
) -> None:
    """Any arrival order (the list order is the arrival order, so out-of-order and late readings are common):
    every non-empty window of every end equals the oracle's, each once, and the late count is the oracle's."""
    config = WindowConfig(tuple(w * S for w in windows), slide * S, lateness_s * S)
    engine = make_engine(strategy, config)  # type: ignore[arg-type]
    emitted = run_all(engine, readings)
    expected, late = oracle(readings, config.windows_ns, config.slide_ns, config.allowed_lateness_ns)
    mismatches, sample = compare(emitted, expected)
    assert mismatches == 0, sample
    assert engine.late == late
    assert engine.accepted + engine.late == len(readings)


def test_slide_of_two_seconds_and_ticks_between_readings() -> None:
    """A slide other than 1 s, and ticks that fall between readings, on a hand-checked case."""
    config = WindowConfig((4 * S,), 2 * S, 0)
    for strategy in ("naive", "improved"):
        engine = make_engine(strategy, config)
        for ts, value in ((0, 1.0), (1 * S, 3.0), (2 * S, 5.0), (5 * S, 7.0)):
            engine.add("m", ts, value)
        engine.add("m", 1 * S, 100.0)  # older than the watermark (5 s): late, left out
        values = {(v.end_ns // S): (v.count, v.mean, v.max) for v in engine.advance() + engine.finish()}
        # ends 2, 4, 6, 8: [-2,2) {1,3}; [0,4) {1,3,5}; [2,6) {5,7}; [4,8) {7}
        assert values == {2: (2, 2.0, 3.0), 4: (3, 3.0, 5.0), 6: (2, 6.0, 7.0), 8: (1, 7.0, 7.0)}
        assert engine.late == 1


def test_compare_catches_a_wrong_missing_or_doubled_value() -> None:
    """The measurement is not vacuous: a changed mean, a missing window and a doubled one each count."""
    readings = [("m", t * S, float(t)) for t in range(20)]
    config = WindowConfig((5 * S,), S, 0)
    emitted = run_all(make_engine("improved", config), readings)
    expected, _ = oracle(readings, config.windows_ns, config.slide_ns, 0)
    assert compare(emitted, expected)[0] == 0
    wrong = [dataclasses.replace(emitted[3], mean=emitted[3].mean + 1e-6), *emitted[4:], emitted[5]]
    count, sample = compare(wrong, expected)
    assert count == 1 + 1 + 3  # the changed one, the doubled one, and emitted[0..2] missing
    assert any("emitted twice" in s for s in sample)


def _burst(n: int, rate_per_s: float) -> list[Arrival]:
    step = round(S / rate_per_s)
    return [Arrival(k * step, k, "m", k * step, 1.0) for k in range(n)]


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_drops_are_counted_and_named_by_policy(policy: str) -> None:
    """1,000 rows at 1,000/s into a 100-row buffer drained at 100 rows/s: the consumer takes what is buffered
    when free. Every row is either consumed once or dropped once, named by the policy."""
    delivery = through_buffer(_burst(1000, 1000), policy, capacity=100, consumer_rate=100)  # type: ignore[arg-type]
    consumed = [r.seq for _, batch in delivery.batches for r in batch]
    dropped = delivery.dropped[f"overflow_{policy}"]
    assert sorted(consumed + dropped) == list(range(1000))
    assert len(set(consumed)) == len(consumed)
    assert list(delivery.dropped) == [f"overflow_{policy}"]
    # 1 s of burst at 100 rows/s consumed + 100 held at most: about 800 dropped (batch edges move it by a row).
    assert 790 <= len(dropped) <= 810
    if policy == "drop_newest":
        assert consumed[:100] == list(range(100))  # the first buffer-full is kept, what came on top is not
    else:
        assert consumed[-1] == 999  # the newest survive


def test_block_drops_nothing_and_the_producer_waits() -> None:
    delivery = through_buffer(_burst(1000, 1000), "block", capacity=100, consumer_rate=100)
    consumed = [r.seq for _, batch in delivery.batches for r in batch]
    assert consumed == list(range(1000)) and not delivery.dropped
    assert delivery.wait_max_ns == S
    # 1,000 rows at 100/s take 10 s of consumer time; the last is offered about 1 s (a buffer-full) before the
    # end, and the arrivals spanned 1 s: the producer ends ~8 s behind. Each wait is one 100-row batch: 1 s.
    assert delivery.wait_ns > 7 * S


def test_memory_naive_grows_with_readings_improved_with_buckets() -> None:
    """Element counts (not bytes, not time): 10x the rate gives naive about 10x the elements, improved the same
    number (its buckets are per second whatever the rate)."""
    config = WindowConfig((60 * S,), S, 0)
    peaks = {}
    for rate in (10, 100):
        delivery = through_buffer(_burst(rate * 120, rate), "block", capacity=10_000, consumer_rate=10_000)
        for strategy in ("naive", "improved"):
            peaks[(strategy, rate)] = drive(strategy, config, delivery, S, keep=False).peak_elements
    assert peaks[("naive", 100)] >= 9 * peaks[("naive", 10)]
    assert peaks[("improved", 100)] == peaks[("improved", 10)] <= 2 * 62  # 60 buckets + max deque + open ones


SPEC = StreamSpec(
    seed=3,
    machines=("m0", "m1", "m2"),
    phases=(PhaseSpec("steady", 60, 30.0), PhaseSpec("burst", 3, 300.0), PhaseSpec("steady", 60, 30.0)),
)


def test_measure_is_correct_and_reconciled_under_every_policy() -> None:
    settings_ = WindowsSettings(late_fraction=0.05, consumer_rate=60, memory_windows=(10.0, 60.0))
    outcomes = measure(SPEC, settings_, capacity=50)
    assert [o.name for o in outcomes] == [
        f"{s}-{p}" for p in ("block", "drop_oldest", "drop_newest") for s in ("naive", "improved")
    ]
    for o in outcomes:
        part = o.result["windows"]
        assert part["mismatches"] == 0 and part["expected"] > 0, part["mismatch_sample"]
        assert o.ledger.reconciled and not o.errors, (o.name, o.errors)
        assert part["late"] == part["oracle_late"] > 0  # 5 % held back up to 5 s, 2 s allowed: some are late
        if part["policy"] == "block":
            assert part["dropped"] == {} and part["producer_wait_s"] > 0
        else:
            assert part["dropped"] == {f"overflow_{part['policy']}": o.ledger.dropped} and o.ledger.dropped > 0
    naive, improved = outcomes[0].result["windows"]["sweep"], outcomes[1].result["windows"]["sweep"]
    # 30/s over 3 machines: naive holds every reading of the window (~10 per machine-second, plus the burst's
    # 900), improved per machine at most 60 buckets + 60 max-deque entries + the few still open (lateness 2 s).
    assert naive[1]["peak_elements"] > 4 * improved[1]["peak_elements"]
    assert improved[1]["peak_elements"] <= 3 * (60 + 60 + 4)
    assert naive[1]["peak_elements"] > 2 * naive[0]["peak_elements"]  # 60 s window against 10 s


def test_bench_run_of_the_shipped_scenario_shape(tmp_path: Path, write_scenario: Callable[[str], Path]) -> None:
    """`bench run` dispatches a windows section to this harness and writes typed results (a small stream)."""
    path = write_scenario(
        "name: win\nmachines: {count: 2}\nphases:\n  - {kind: steady, rate: 20, duration: 30s}\n"
        "  - {kind: burst, rate: 200, duration: 2s}\n"
        "pipeline: {buffer: {size: 40, capacity: 40}}\n"
        "windows: {windows: [5s, 10s], consumer_rate: 50, late_fraction: 0.05, memory_windows: [10s]}\n"
    )
    outcome = run(load_scenario(path), RunOptions(out=tmp_path / "run", calibrate=False))
    assert outcome.ok, outcome.problems()
    names = [v.name for v in outcome.results.variants]
    assert names == [f"{s}-{p}" for p in ("block", "drop_oldest", "drop_newest") for s in ("naive", "improved")]
    assert all(v.windows is not None and v.windows.mismatches == 0 for v in outcome.results.variants)


@pytest.mark.parametrize(
    ("section", "where", "expected"),
    [
        ("{windows: [0s]}", "windows.windows[0]", "greater than 0"),
        ("{windows: [-10]}", "windows.windows[0]", "greater than 0"),
        ("{slide: 0}", "windows.slide", "greater than 0"),
        ("{slide: -1}", "windows.slide", "greater than 0"),
        ("{windows: [10s], slide: 20s}", "windows: slide", "larger than windows[0]"),
        ("{windows: [10s, 1m], slide: 4s}", "windows: windows[0]", "not a multiple of slide"),
        ("{evaluate_every: 0}", "windows.evaluate_every", "greater than 0"),
        ("{evaluate_every: -0.5}", "windows.evaluate_every", "greater than 0"),
        ("{allowed_lateness: -1}", "windows.allowed_lateness", "greater than or equal to 0"),
        ("{memory_windows: [10m], slide: 11m, windows: [11m]}", "windows: slide", "memory_windows[0]"),
    ],
)
def test_bad_intervals_are_refused_naming_the_field(
    write_scenario: Callable[[str], Path], section: str, where: str, expected: str
) -> None:
    path = write_scenario(f"name: x\nphases:\n  - {{kind: steady, rate: 10, duration: 2s}}\nwindows: {section}\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {where}"), message
    assert expected in message and "\n" not in message
