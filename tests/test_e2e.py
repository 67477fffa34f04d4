"""End to end over the embedded broker: stream -> MQTT -> pipeline -> Parquet -> ledger."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from bench.cli import main
from bench.harness import runner
from bench.results import SCHEMA_VERSION
from bench.results.model import Variant, read_results
from bench.scenario import load_scenario
from simulators.stream import planned_count
from tests.conftest import SCENARIOS

SMALL = """
name: small
seed: 3
machines: {count: 4, id: "m-{i}"}
phases:
  - {kind: steady, rate: 200, duration: 1s}
  - {kind: burst, rate: 800, duration: 0.5s}
  - {kind: pause, duration: 0.3s}
  - {kind: ramp, from: 100, to: 300, duration: 1s}
transport: {mqtt: {broker: embedded, qos: 1}}
pipeline:
  buffer: {size: 60, flush_interval: 200ms}
  parquet: {rotate: 1m, fsync: false}
run: {drain_timeout: 10s}
"""


def _check_run(outcome: runner.RunOutcome, planned: int) -> Variant:
    ledger = outcome.ledger
    assert ledger.reconciled, ledger.problems()
    assert (ledger.sent, ledger.persisted, ledger.lost, ledger.duplicates) == (planned, planned, 0, 0)
    rows = ds.dataset(outcome.run_dir / "data", format="parquet").to_table()
    assert rows.num_rows == ledger.persisted, "files must hold exactly what the ledger counts"
    assert sorted(rows.column("seq").to_pylist()) == list(range(planned))
    assert str(rows.schema.field("ts").type) == "timestamp[us, tz=UTC]"
    assert not list(outcome.run_dir.rglob("*.tmp")), "every file must be finalised"
    on_disk = read_results(outcome.run_dir / "results.json")
    assert on_disk == outcome.results
    return on_disk.variants[0]


def test_small_scenario_reconciles_over_embedded_broker(write_scenario: Callable[[str], Path], tmp_path: Path) -> None:
    loaded = load_scenario(write_scenario(SMALL))
    outcome = runner.run(loaded, runner.RunOptions(out=tmp_path / "run"))
    variant = _check_run(outcome, planned=200 + 400 + 200)
    results = outcome.results
    assert results.schema_version == SCHEMA_VERSION
    assert results.scenario.sha256 == loaded.sha256
    assert "pyarrow" in results.environment.packages
    e2e = variant.latency_ms.end_to_end
    assert e2e is not None and e2e.count == 800
    assert e2e.p50 is not None and e2e.p90 is not None and e2e.p99 is not None
    assert e2e.p999 is not None and e2e.max is not None
    assert 0 < e2e.p50 <= e2e.p90 <= e2e.p99 <= e2e.p999 <= e2e.max
    assert "below_zero" not in e2e.model_fields_set, "durable time before intended send time means the clocks disagree"
    flush = variant.probes.flush["parquet"]
    # The burst (800/s: 160 messages per 200 ms against size 60) must fire the size trigger, even delivered at
    # a third of its rate by a broker beside CPU-bound jobs (at size 150 one such run saw no size flush);
    # the pause after it (nothing for 300 ms) must fire the 200 ms timeout trigger.
    assert flush.size is not None and flush.size.count >= 1
    assert flush.timeout is not None and flush.timeout.count >= 1
    assert sum(t.rows for t in (flush.size, flush.timeout, flush.shutdown) if t is not None) == 800
    assert variant.throughput.persisted_per_s is not None and variant.throughput.persisted_per_s > 0


def test_burst_yaml_through_the_cli_with_message_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "burst"
    code = main(["run", str(SCENARIOS / "burst.yaml"), "--messages", "300", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    # The conclusion comes first, before the table, as in the report.
    assert printed.startswith("PASSED: ledger reconciled: 300 sent"), printed[:200]
    ledger = read_results(out).variants[0].ledger
    assert (ledger.sent, ledger.persisted, ledger.lost) == (300, 300, 0)
    assert (out / "scenario.yaml").read_bytes() == (SCENARIOS / "burst.yaml").read_bytes()


def test_qos0_and_poisson_arrivals_reconcile(write_scenario: Callable[[str], Path], tmp_path: Path) -> None:
    text = SMALL.replace("qos: 1", "qos: 0").replace("run: {drain_timeout: 10s}", "run: {arrival: poisson}")
    loaded = load_scenario(write_scenario(text))
    planned = planned_count(loaded.scenario.stream_spec())
    outcome = runner.run(loaded, runner.RunOptions(out=tmp_path / "run"))
    _check_run(outcome, planned)
