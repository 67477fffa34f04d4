"""bench capacity --calibration: the publishers a sweep needs and the steps the load generator limited."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.calibrate.model import Calibration, Machine, Row, Spread
from bench.capacity.model import GENERATOR_HEADROOM, generator_limited, generator_plan
from bench.capacity.sweep import _limit
from bench.cli import main
from bench.results.model import read_results

SMALL = """
name: cap-cal
seed: 3
machines: {count: 8}
phases: [{kind: steady, rate: 100, duration: 2s}]
transport: {kind: mqtt, mqtt: {broker: embedded, topic: "plant/{run}/{machine}/telemetry", qos: 1}}
pipeline:
  buffer: {size: 200, flush_interval: 250ms}
  parquet: {path: data, strategy: writer}
  quarantine: {path: quarantine}
run: {drain_timeout: 10s}
capacity:
  rates: [100, 200]
  step: 3s
  settle: 1s
  publishers: 1
"""


def calibration(ceiling: float) -> Calibration:
    """A calibration whose bench publisher sent ``ceiling`` msg/s at both QoS (made up: the input under test)."""
    one = Spread.of([1.0])
    rate = Spread.of([ceiling])
    rows = [
        Row(
            key=f"publisher_rate_qos{q}",
            label="rate",
            unit="msg/s",
            higher_is_better=True,
            bench=rate,
            bare=one,
            ratio=ceiling,
        )
        for q in (0, 1)
    ]
    return Calibration(
        created_at="2026-01-01T00:00:00+00:00",
        broker="mosquitto",
        broker_url="mqtt://127.0.0.1:1",
        messages=1000,
        repeats=1,
        payload_bytes_mean=100,
        machine=Machine(cores=2, python="3.11", platform="x", paho="2", load_before=None, load_after=None),
        rows=rows,
        generator_ceiling_per_s={"0": ceiling, "1": ceiling},
    )


def test_the_plan_needs_enough_processes_at_the_headroom() -> None:
    plan = generator_plan(ceiling_per_s=1000, publishers=2, highest_rate=4000, qos=1, cores=8, source="c.json")
    # 4,000 msg/s at 800 msg/s per process (80% of 1,000): 5 processes; 2 cover 2,000 msg/s at their ceiling.
    assert plan["needed_publishers"] == 5 == -(-4000 // (1000 * GENERATOR_HEADROOM))
    assert plan["combined_ceiling_per_s"] == 2000
    assert plan["warning"] is not None and "needs 5 publisher processes" in plan["warning"]
    assert [generator_limited(r, plan) for r in (1000, 2000, 2001, 4000)] == [False, False, True, True]
    assert generator_limited(10**9, None) is None
    enough = generator_plan(ceiling_per_s=1000, publishers=5, highest_rate=4000, qos=1, cores=8, source="c.json")
    assert enough["warning"] is None and enough["combined_ceiling_per_s"] == 5000
    # More processes than cores: they share the cores, so only one per core counts towards the ceiling.
    crowded = generator_plan(ceiling_per_s=1000, publishers=6, highest_rate=4000, qos=1, cores=2, source="c.json")
    assert crowded["combined_ceiling_per_s"] == 2000 and "more than this machine's 2 cores" in crowded["warning"]


def _step(offered: float, verdict: str, flagged: bool | None) -> dict[str, object]:
    return {
        "offered_per_s": offered,
        "verdict": verdict,
        "send_lag_p99_ms": 900.0,
        "cpu_pct_per_worker": 95.0,
        "publisher_cpu_pct": 99.0,
        "generator_limited": flagged,
    }


def test_the_limit_line_names_the_generator_instead_of_the_pipeline() -> None:
    plan = generator_plan(ceiling_per_s=1000, publishers=1, highest_rate=4000, qos=1, cores=2, source="c.json")
    ok = _step(500, "sustainable", False)
    # Without a calibration the busy pipeline worker is the limit; past the ceiling it is the generator.
    plain = _limit([ok, _step(2000, "unsustainable", None)])
    assert plain is not None and plain.startswith("the pipeline's CPU")
    line = _limit([ok, _step(2000, "unsustainable", True)], generator=plan)
    assert line is not None and line.startswith("the load generator") and "generator-limited" in line
    lag = _limit([ok, _step(2000, "publisher-limited", True)], generator=plan)
    assert lag is not None and lag.startswith("publishers (send lag") and "calibrated ceiling 1,000" in lag
    assert "generator" not in (_limit([ok, _step(900, "publisher-limited", False)], generator=plan) or "")


def test_a_sweep_with_a_calibration_flags_the_steps_above_the_ceiling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cap.yaml"
    path.write_text(SMALL, encoding="utf-8")
    cal = tmp_path / "cal"
    cal.mkdir()
    # One publisher process whose calibrated ceiling lies between the two steps' rates.
    (cal / "calibration.json").write_text(calibration(150).model_dump_json(), encoding="utf-8")
    code = main(["capacity", str(path), "--out", str(tmp_path / "run"), "--calibration", str(cal)])
    captured = capsys.readouterr()
    cap = read_results(tmp_path / "run").capacity
    assert cap is not None and cap.generator is not None
    assert (cap.generator.publishers, cap.generator.needed_publishers) == (1, 2)  # 200 / (150 x 0.8) -> 2
    assert cap.generator.combined_ceiling_per_s == 150
    assert "bench: warning: capacity.publishers is 1" in captured.err
    steps = cap.series[0].steps
    flagged = {s.offered_per_s: s.generator_limited for s in steps}
    assert flagged.get(100.0) is False
    # The second step runs unless the first failed (a loaded machine); when it ran, it is flagged.
    if 200.0 in flagged:
        assert flagged[200.0] is True
        assert "generator-limited steps: 200 msg/s" in captured.out
    table = captured.out.split("generator:")[0]
    if 200.0 in flagged:  # the step's row is marked and the caption says what the mark means
        assert "200 *" in table and "* generator-limited: offered past the publishers' calibrated ceiling" in table
    assert code in (0, 1)


def test_without_a_calibration_nothing_is_flagged_or_planned(tmp_path: Path) -> None:
    path = tmp_path / "cap.yaml"
    path.write_text(SMALL.replace("rates: [100, 200]", "rates: [100]"), encoding="utf-8")
    code = main(["capacity", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    cap = read_results(tmp_path / "run").capacity
    assert cap is not None and cap.generator is None
    assert [s.generator_limited for s in cap.series[0].steps] == [None]
    assert code in (0, 1) and os.cpu_count()


def test_without_mosquitto_it_falls_back_to_the_embedded_broker_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.calibrate import runner
    from simulators import mosquitto
    from simulators.errors import BrokerStartError

    def missing(self: object, *args: object, **kwargs: object) -> None:
        raise BrokerStartError("mosquitto is not installed")

    monkeypatch.setattr(mosquitto.ManagedMosquitto, "__init__", missing)
    warnings: list[str] = []
    outcome = runner.run_calibrate(
        runner.CalibrateOptions(messages=1_000, repeats=1, out=tmp_path / "run", only=("pipeline",)),
        on_warning=warnings.append,
    )
    cal = outcome.calibration
    assert cal.broker == "embedded" and warnings == [runner.EMBEDDED_WARNING] == cal.warnings
    # The pipeline pair went through it on the plain topic (amqtt has no shared subscriptions): all 1,000 arrived.
    row = cal.row("pipeline_cpu_qos1")
    assert row is not None and row.bench.median > 0 and row.bare.median > 0
    finals = list((outcome.run_dir / "children").glob("*-pipeline/final.json"))
    assert len(finals) == 1 and '"received": 1000' in finals[0].read_text()
