"""Process faults for real: the built-in pipeline as its own process, killed (SIGKILL) or stopped (SIGTERM) and
restarted by the bench, and losses in the fault's window named by the fault only when the configuration did
not promise to survive it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench.errors import ScenarioError
from bench.harness import runner
from bench.harness.accounting import CrashWindow, Sends, account
from bench.harness.ledger import ReadBack
from bench.harness.sut import Output
from bench.scenario import load_scenario
from simulators.stream import PhaseSpec, StreamSpec

SCENARIO = """
name: process-fault
seed: 5
machines: {count: 4}
transport: {kind: mqtt, mqtt: {qos: 1}}
system: {kind: process}
phases:
  - {kind: steady, rate: 300, duration: 5}
pipeline:
  buffer: {size: 500, flush_interval: 0.5}
faults:
  - {kind: FAULT, at: 2, restart_after: 0.5}
# A naive pipeline loses what was sent while it was down: the drain would wait its whole timeout for it.
run: {drain_timeout: 4}
"""


def _run(write_scenario: Callable[[str], Path], tmp_path: Path, fault: str) -> runner.RunOutcome:
    loaded = load_scenario(write_scenario(SCENARIO.replace("FAULT", fault)))
    return runner.run(loaded, runner.RunOptions(out=tmp_path / "run", calibrate=False))


def test_a_killed_pipeline_process_is_restarted_and_its_losses_are_named(
    write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    """kill -9 of the naive pipeline: the open file and the buffer die with it, and what is sent while it is
    down is gone (clean session). All of that is named process_kill; nothing is left unexplained."""
    outcome = _run(write_scenario, tmp_path, "process_kill")
    v = outcome.results.variants[0]
    assert v.system is not None and v.system.starts == 2
    assert v.system.exit_codes[0] == -9, "the first start was killed by SIGKILL"
    assert v.fault_events is not None and len(v.fault_events) == 1
    event = v.fault_events[0]
    assert event.kind == "process_kill" and event.error is None
    assert event.recovered_s is not None and event.recovered_s >= 0.5, "restart_after is waited, then it subscribes"
    led = outcome.ledger
    assert led.lost == 0, led.problems()
    assert led.dropped_by_reason.get("process_kill", 0) > 0, "a naive pipeline loses something to kill -9"
    assert led.sent == led.persisted + led.dropped


def test_a_gracefully_restarted_pipeline_process_exits_cleanly(
    write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    outcome = _run(write_scenario, tmp_path, "process_restart")
    v = outcome.results.variants[0]
    assert v.system is not None and v.system.exit_codes[0] == 0, "SIGTERM: the pipeline flushed and exited"
    led = outcome.ledger
    assert led.lost == 0, led.problems()
    # What it had received was flushed on SIGTERM; only what was sent while it was down can be missing.
    assert led.persisted + led.dropped_by_reason.get("process_restart", 0) == led.sent


def test_only_losses_inside_a_crash_window_are_named() -> None:
    """Seqs 0-9 intended 1 s apart; 3-5 fall in the window and were lost: named. 8 was lost outside: lost."""
    spec = StreamSpec(1, ("m-0",), (PhaseSpec("steady", 10.0, 1.0),))
    intended = [i * 1_000_000_000 for i in range(10)]
    kept = [0, 1, 2, 6, 7, 9]
    back = ReadBack(kept, [0] * len(kept), [], [], 1, [])
    sends = Sends(list(range(10)), intended, lambda seq: True)
    window = CrashWindow("process_kill", 2_500_000_000, 5_500_000_000)
    ledger = account(sends, Output(back, durable=[]), spec, crashes=[window]).ledger
    assert ledger.dropped_by_reason == {"process_kill": 3}
    assert ledger.lost == 1 and ledger.missing_seq_sample == [8]
    unattributed = account(sends, Output(back, durable=[]), spec).ledger
    assert unattributed.lost == 4 and unattributed.dropped == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SCENARIO.replace("system: {kind: process}\n", ""), "expected system.kind: process"),
        (
            SCENARIO.replace("transport: {kind: mqtt, mqtt: {qos: 1}}", "transport: {kind: memory}"),
            "expected transport.kind mqtt",
        ),
        (SCENARIO.replace("restart_after: 0.5", "restart_after: 0.5, times: 3"), "times > 1 needs every"),
    ],
)
def test_process_faults_are_refused_where_they_cannot_run(
    write_scenario: Callable[[str], Path], text: str, message: str
) -> None:
    with pytest.raises(ScenarioError, match=message):
        load_scenario(write_scenario(text.replace("FAULT", "process_kill")))
