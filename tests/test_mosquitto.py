"""The same loop over the real Mosquitto on loopback (skips without it, unless BENCH_REQUIRE_SERVICES=1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from bench.harness import runner
from bench.scenario import load_scenario

pytestmark = pytest.mark.services

# {run} in the topic keeps concurrent runs on a shared broker apart.
SCENARIO = """
name: mosquitto
seed: 11
machines: {count: 5, id: "press-{i:02d}"}
phases:
  - {kind: steady, rate: 300, duration: 1s}
  - {kind: burst, rate: 1500, duration: 0.5s}
  - {kind: steady, rate: 300, duration: 1s}
transport: {mqtt: {broker: embedded, topic: "iiot-bench-test/{run}/{machine}/telemetry", qos: 1}}
pipeline:
  buffer: {size: 250, flush_interval: 250ms}
"""


def test_reconciles_over_real_mosquitto(
    mosquitto_url: str, write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    loaded = load_scenario(write_scenario(SCENARIO))
    outcome = runner.run(loaded, runner.RunOptions(out=tmp_path / "run", broker=mosquitto_url))
    ledger = outcome.ledger
    assert ledger.reconciled, ledger.problems()
    assert (ledger.sent, ledger.persisted, ledger.lost, ledger.duplicates, ledger.unexpected) == (1350, 1350, 0, 0, 0)
    assert ds.dataset(outcome.run_dir / "data", format="parquet").count_rows() == 1350
    transport = outcome.results.variants[0].config.transport
    assert transport is not None and transport.broker == mosquitto_url
    assert not (outcome.run_dir / "broker.log").exists(), "no embedded broker may start when a URL is given"
