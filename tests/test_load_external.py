"""``bench load`` against an external system: locust publishes, the user's program subscribes, the ledger comes
from that program's own output.

The system under test is tests/data/ext_load_pipeline.py (paho, one JSON line per reading with its seq and the
wall time it wrote it), started by the bench with "{python}"; the broker is the embedded one, so the tests need
no service.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from bench.cli import load as load_cli
from bench.errors import UsageError
from bench.harness.external_sut import WATCH_EVERY_S
from bench.load.runner import LoadOptions, run_load
from bench.results.model import Results, read_results
from bench.scenario import load_scenario
from tests.conftest import ROOT

PIPELINE = ROOT / "tests" / "data" / "ext_load_pipeline.py"
MESSAGES = 300
SCENARIO = f"""
name: ext_load
seed: 3
machines: {{count: 4}}
transport: {{kind: mqtt, mqtt: {{broker: embedded, qos: 1}}}}
system:
  kind: external
  external:
    command: ["{{python}}", "{PIPELINE}", "{{broker_url}}", "{{topic}}", "{{out_dir}}/out.jsonl" EXTRA]
    ready: {{log: "ext_load: subscribed", timeout: 30s}}
    output: {{format: jsonl, path: "{{out_dir}}/out.jsonl", columns: {{seq: seq, durable_at: DURABLE}}}}
phases:
  - {{kind: steady, rate: 300, duration: 1s}}
run: {{drain_timeout: 2s}}
"""


def _scenario(write_scenario: Callable[[str], Path], *, extra: str = "", durable: str = "at") -> Path:
    return write_scenario(SCENARIO.replace(" EXTRA", extra).replace("DURABLE", durable))


def _load(path: Path, run_dir: Path, *more: str) -> int:
    parser = argparse.ArgumentParser(prog="bench")
    load_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["load", str(path), "--messages", str(MESSAGES), "--out", str(run_dir), "--quiet", *more])
    return load_cli.command(args)


def test_an_external_pipeline_under_locust_load_reconciles_with_latency_and_cpu(
    tmp_path: Path, write_scenario: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    # No durable_at column: the bench watches the output, and says at what resolution.
    path = _scenario(write_scenario, durable="null")
    assert _load(path, run_dir, "--workers", "2") == 0, capsys.readouterr().err

    v = read_results(run_dir).variants[0]
    assert v.ledger.reconciled and v.ledger.sent == v.ledger.persisted == MESSAGES and v.ledger.lost == 0
    assert v.load is not None and v.load.coverage.published == MESSAGES and v.load.workers == 2
    # Its output was watched: every persisted row has a latency, with the polling interval beside it.
    system = v.system
    assert system is not None and system.kind == "external" and system.starts == 1 and system.exit_codes == [0]
    assert system.durable_from == "watching" and system.durable_resolution_ms == WATCH_EVERY_S * 1000
    e2e = v.latency_ms.end_to_end
    assert e2e is not None and e2e.count == MESSAGES and e2e.p50 is not None and e2e.p50 >= 0
    assert system.cpu_s is not None and system.cpu_s > 0 and system.cpu_s_per_1k is not None
    assert system.peak_rss_mb is not None and system.peak_rss_mb > 5
    assert v.throughput.persisted_per_s is not None and v.throughput.persisted_per_s > 0
    # What only the built-in pipeline can tell is absent, not zero.
    assert v.pipeline is None and v.probes.lock is None and v.probes.queue_depth is None and v.probes.flush == {}
    assert v.throughput.sink_rows_per_s is None
    assert (run_dir / "system.log").read_text().count("ext_load: subscribed") == 1

    table = capsys.readouterr().out
    assert f"(watched every {WATCH_EVERY_S * 1000:.0f} ms)" in table, table
    assert "CPU s / 1k msgs" in table and "peak RSS MB" in table, table
    # The results.json written is the one read: nothing of the built-in pipeline slipped in as zeros.
    raw = json.loads((run_dir / "results.json").read_text())["variants"][0]
    assert raw["probes"]["lock"] is None and raw["pipeline"] is None


def test_messages_an_external_pipeline_drops_are_lost(tmp_path: Path, write_scenario: Callable[[str], Path]) -> None:
    path = _scenario(write_scenario, extra=', "--drop-every", "10"')
    # The runner itself (the command line is the test above's): a shorter start lead, no report to render.
    options = LoadOptions(workers=1, messages=MESSAGES, out=tmp_path / "run", start_lead_s=1.0)
    outcome = run_load(load_scenario(path), options)

    assert not outcome.ok
    v = outcome.results.variants[0]
    assert not v.ledger.reconciled
    assert v.ledger.sent == MESSAGES and v.ledger.lost == MESSAGES // 10
    assert v.ledger.persisted == MESSAGES - MESSAGES // 10
    assert v.ledger.missing_seq_sample and all(seq % 10 == 0 for seq in v.ledger.missing_seq_sample)
    assert any("message(s) lost; missing seq ids include: 0, 10, 20" in p for p in outcome.ledger.problems())
    # Its own durable_at column: exact times, no polling resolution.
    assert v.system is not None and v.system.durable_from == "column" and v.system.durable_resolution_ms is None
    assert v.latency_ms.end_to_end is not None and v.latency_ms.end_to_end.count == v.ledger.persisted
    assert "(its durable_at column)" in _table_text(outcome.results)


def _table_text(results: Results) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(load_cli.summary_table(results))
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("phases:", "faults: [{kind: slow_sink, delay: 10ms}]\nphases:"), "slow_sink"),
        (
            lambda t: t.replace("run:", "faults: [{kind: process_kill, at: 1s, restart_after: 1s}]\nrun:"),
            "process_kill not supported by bench load",
        ),
    ],
    ids=["slow-sink", "timed-fault"],
)
def test_what_cannot_apply_to_an_external_system_is_refused_in_one_line(
    tmp_path: Path, write_scenario: Callable[[str], Path], edit: Callable[[str], str], message: str
) -> None:
    path = write_scenario(edit(SCENARIO.replace(" EXTRA", "").replace("DURABLE", "at")))
    with pytest.raises(UsageError, match=message) as caught:
        _load(path, tmp_path / "never")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "never").exists()
