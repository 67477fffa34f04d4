"""The faults of a scenario beyond a process crash, for real: a broker restarted, the network to it cut, a full
disk, failing writes, the database cut off; and a matrix that breaks half way still writes its results.

One crash-safe run carries several faults (a run costs seconds of real time each); the ledger must show no
unexplained loss, and each fault its own entry: when it struck, how long it lasted, when the pipeline was back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.errors import ScenarioError
from bench.harness import runner
from bench.harness.fault_ledger import promised
from bench.scenario import BrokerRestartFault, load_scenario
from pipeline.config import PipelineSettings
from tests.conftest import require_service

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

BROKER_FAULTS = """
name: broker-faults
seed: 7
machines: {count: 4}
transport: {kind: mqtt, mqtt: {broker: BROKER, qos: 1}}
system: {kind: process}
phases:
  - {kind: steady, rate: 250, duration: 9}
pipeline:
  buffer: {size: 500, flush_interval: 0.5}
  durability: crash_safe
faults:
  - {kind: broker_restart, at: 1.5, duration: 1}
  - {kind: broker_partition, at: 4, duration: 1, mode: drop}
  - {kind: broker_partition, at: 6, duration: 1, mode: delay, delay: 0.3}
run: {drain_timeout: 10}
"""


def _run(write_scenario: Callable[[str], Path], tmp_path: Path, text: str) -> runner.RunOutcome:
    return runner.run(load_scenario(write_scenario(text)), runner.RunOptions(out=tmp_path / "run", calibrate=False))


def test_a_crash_safe_pipeline_loses_nothing_to_a_broker_restart_and_partitions(
    write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    """A bench-managed Mosquitto (persistence on) restarted, then the pipeline's connection dropped and delayed
    through the bench's proxy: a persistent session and acknowledgement after durable keep every message."""
    outcome = _run(write_scenario, tmp_path, BROKER_FAULTS.replace("BROKER", "mosquitto"))
    led = outcome.ledger
    assert led.lost == 0 and led.duplicates == 0, led.problems()
    assert led.persisted == led.sent, "promised: nothing named, nothing dropped"
    events = outcome.results.variants[0].fault_events
    assert events is not None and [e.kind for e in events] == ["broker_restart", "broker_partition", "broker_partition"]
    for e in events:
        assert e.error is None and e.expected_loss is False
        assert e.duration_s is not None and e.duration_s >= 0.9, "the fault lasted its duration"
        assert e.recovered_s is not None and e.recovered_s >= e.duration_s, "back only after the fault ended"
        assert e.lost == 0
    assert events[0].latency_ms is not None and events[0].latency_kind == "receive"
    # What was sent while the broker was down waited for it: the spike is at least most of the outage.
    assert events[0].latency_ms.max >= 500


def test_the_embedded_broker_forgets_sessions_so_its_restart_losses_are_named(
    write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    """amqtt keeps no session across a restart: what it held for the pipeline is gone, and the ledger names it
    broker_restart (expected) instead of calling it lost."""
    text = BROKER_FAULTS.replace("BROKER", "embedded").split("  - {kind: broker_partition")[0]
    # Losses are expected here: a short drain timeout keeps the run from waiting for what will never come.
    text += "run: {drain_timeout: 3}\n"
    outcome = _run(write_scenario, tmp_path, text)
    led = outcome.ledger
    assert led.lost == 0, led.problems()
    events = outcome.results.variants[0].fault_events
    assert events is not None and events[0].expected_loss is True
    assert led.sent == led.persisted + led.dropped_by_reason.get("broker_restart", 0)


def test_what_each_configuration_promised() -> None:
    naive, safe = PipelineSettings(), PipelineSettings(durability="crash_safe")
    kept = BrokerRestartFault(kind="broker_restart", at=1, duration=1)
    forgot = BrokerRestartFault(kind="broker_restart", at=1, duration=1, persistence=False)
    assert promised("process_kill", None, safe, qos=1, broker="embedded")
    assert not promised("process_kill", None, safe, qos=0, broker="embedded"), "QoS 0 is lost by design"
    assert not promised("process_kill", None, naive, qos=1, broker="embedded")
    assert promised("broker_restart", kept, safe, qos=1, broker="mosquitto")
    assert not promised("broker_restart", forgot, safe, qos=1, broker="mosquitto")
    assert not promised("broker_restart", kept, safe, qos=1, broker="embedded"), "amqtt keeps nothing"
    assert promised("disk_full", None, safe, qos=0, broker=None), "a sink fault: the pipeline holds, whatever QoS"
    assert not promised("sink_error", None, naive, qos=1, broker=None)


STORAGE_FAULTS = """
name: storage-faults
seed: 8
machines: {count: 4}
transport: {kind: mqtt, mqtt: {qos: 1}}
system: {kind: process}
phases:
  - {kind: steady, rate: 250, duration: 8}
pipeline:
  buffer: {size: 500, flush_interval: 0.5}
  durability: crash_safe
  SQL
faults:
  FAULTS
run: {drain_timeout: 10}
"""


def test_a_crash_safe_pipeline_holds_through_failing_writes_and_a_database_outage(
    write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    sql = f'sql: {{url: "{PG_URL}", table: fault_kinds_test, aggregate: raw, reset: true, strategy: upsert}}'
    faults = "\n  ".join(
        [
            "- {kind: sink_error, at: 1, duration: 1.5, fraction: 0.6}",
            "- {kind: db_outage, at: 3.5, duration: 1.5, mode: down}",
            "- {kind: db_outage, at: 5.5, duration: 1.5, mode: flap, reset_every: 0.3}",
        ]
    )
    outcome = _run(write_scenario, tmp_path, STORAGE_FAULTS.replace("SQL", sql).replace("FAULTS", faults))
    led = outcome.ledger
    assert led.lost == 0 and led.duplicates == 0 and led.persisted == led.sent, led.problems()
    v = outcome.results.variants[0]
    assert v.sql is not None and v.sql.check == "ok", "the SQL table holds every row the Parquet data holds"
    assert outcome.ok, outcome.problems()
    assert v.fault_events is not None and all(e.error is None and e.lost == 0 for e in v.fault_events)


@pytest.mark.skipif(os.geteuid() != 0, reason="disk_full mounts a tmpfs: needs root")
def test_a_crash_safe_pipeline_waits_out_a_full_disk_and_recovers_without_a_restart(
    write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    faults = "- {kind: disk_full, at: 2, duration: 2, volume_mb: 64}"
    text = STORAGE_FAULTS.replace("  SQL\n", "").replace("FAULTS", faults)
    outcome = _run(write_scenario, tmp_path, text)
    led = outcome.ledger
    assert led.lost == 0 and led.persisted == led.sent, led.problems()
    assert not led.unreadable_files and not led.unfinalised_files
    v = outcome.results.variants[0]
    assert v.system is not None and v.system.starts == 1, "recovered without a restart"
    (event,) = v.fault_events or []
    assert event.error is None and event.recovered_s is not None and event.recovered_s >= 2
    # The data came off the tmpfs onto the disk underneath: the run folder is complete after the unmount.
    data = tmp_path / "run" / "data"
    assert not os.path.ismount(data) and any(data.glob("*.parquet"))


def test_a_variant_that_cannot_run_leaves_the_others_results(
    write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    """The second variant's database is a closed port: the first variant's results are kept, the failure is
    in results.json, the run is not ok."""
    text = """
name: half-broken
seed: 3
machines: {count: 2}
transport: {kind: memory}
phases: [{kind: steady, rate: 200, duration: 1}]
matrix:
  - {name: fine}
  - {name: broken, pipeline.sql.url: "postgresql+psycopg://postgres@127.0.0.1:9/test"}
"""
    outcome = _run(write_scenario, tmp_path, text)
    assert not outcome.ok
    assert [v.name for v in outcome.results.variants] == ["fine"]
    data = json.loads((outcome.run_dir / "results.json").read_text())
    (failure,) = data["failures"]
    assert failure["variant"] == "broken" and "SQL" in failure["error"]
    assert any("broken: could not run" in p for p in outcome.problems())


def test_faults_that_do_not_fit_the_scenario_are_refused(write_scenario: Callable[[str], Path]) -> None:
    base = "name: x\nphases: [{kind: steady, rate: 10, duration: 1}]\n"
    cases = {
        "- {kind: broker_restart, at: 1, duration: 1}": (
            "transport: {mqtt: {broker: 'mqtt://127.0.0.1:1883'}}",
            "a URL",
        ),
        "- {kind: db_outage, at: 1, duration: 1}": ("", "no pipeline.sql"),
        "- {kind: broker_partition, at: 1, duration: 2, times: 2, every: 2}": ("", "must be longer than duration"),
    }
    for fault, (extra, message) in cases.items():
        with pytest.raises(ScenarioError, match=message):
            load_scenario(write_scenario(base + extra + "\nfaults:\n  " + fault + "\n"))
