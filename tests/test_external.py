"""A pipeline the user brings (system.kind external): started by command, read back from its own output, killed
and restarted like any service; and the one-line error for each thing a user can get wrong."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.errors import ScenarioError, ServiceError
from bench.harness import runner
from bench.scenario import load_scenario

# A minimal external pipeline: subscribes, writes each reading's seq and a durable time as a JSON line.
MINI = """
import json, signal, sys, time
from urllib.parse import urlsplit
import paho.mqtt.client as mqtt

url, topic, out = sys.argv[1], sys.argv[2], sys.argv[3]
where = urlsplit(url)
f = open(out, "a", buffering=1)

def on_message(client, userdata, msg):
    d = json.loads(msg.payload)
    f.write(json.dumps({"seq": d["seq"], "machine": d["machine"], "at": time.time()}) + "\\n")

def on_subscribe(client, userdata, mid, codes, props):
    print("mini: subscribed", flush=True)

c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
c.on_message, c.on_subscribe = on_message, on_subscribe
c.on_connect = lambda client, userdata, flags, rc, props: client.subscribe(topic, qos=1)
c.connect(where.hostname, where.port)
signal.signal(signal.SIGTERM, lambda *a: (c.disconnect(), f.close(), sys.exit(0)))
c.loop_forever()
"""

SCENARIO = """
name: external
seed: 1
machines: {count: 4}
transport: {kind: mqtt, mqtt: {qos: 1}}
system:
  kind: external
  external:
    command: [PYTHON, mini.py, "{broker_url}", "{topic}", "{out_dir}/out.jsonl"]
    ready: {log: "subscribed", timeout: 20s}
    output: {format: jsonl, path: "{out_dir}/out.jsonl", columns: {durable_at: at}}
phases:
  - {kind: steady, rate: 200, duration: 2s}
run: {drain_timeout: 3s}
"""


def _scenario(tmp_path: Path, write_scenario: Callable[[str], Path], text: str = SCENARIO, script: str = MINI) -> Path:
    (tmp_path / "mini.py").write_text(script, encoding="utf-8")
    return write_scenario(text.replace("PYTHON", sys.executable))


def _run(path: Path, tmp_path: Path) -> runner.RunOutcome:
    return runner.run(load_scenario(path), runner.RunOptions(out=tmp_path / "run", calibrate=False))


def test_an_external_pipeline_is_measured_from_its_own_output(
    tmp_path: Path, write_scenario: Callable[[str], Path]
) -> None:
    outcome = _run(_scenario(tmp_path, write_scenario), tmp_path)
    assert outcome.ok, outcome.problems()
    v = outcome.results.variants[0]
    assert v.ledger.persisted == v.ledger.sent == 400
    assert v.system is not None and v.system.kind == "external" and v.system.starts == 1
    assert v.system.exit_codes == [0], "SIGTERM: it stopped cleanly"
    assert v.system.durable_from == "column"
    e2e = v.latency_ms.end_to_end
    assert e2e is not None and e2e.count == 400 and e2e.p50 is not None and e2e.p50 >= 0
    assert v.system.cpu_s is not None and v.system.cpu_s > 0, "its process tree's CPU, from psutil"
    assert v.system.peak_rss_mb is not None and v.system.peak_rss_mb > 5


def test_a_killed_external_pipeline_shows_its_losses_per_restart(
    tmp_path: Path, write_scenario: Callable[[str], Path]
) -> None:
    """Clean session: what is sent while it is down is gone. The bench cannot know what a user's pipeline
    promised, so every such loss is lost (unexplained), counted against the kill."""
    text = SCENARIO.replace("run:", "faults:\n  - {kind: process_kill, at: 1s, restart_after: 0.5s}\nrun:")
    outcome = _run(_scenario(tmp_path, write_scenario, text), tmp_path)
    v = outcome.results.variants[0]
    assert v.system is not None and v.system.starts == 2 and v.system.exit_codes[0] == -9
    (event,) = v.fault_events or []
    assert event.kind == "process_kill" and event.expected_loss is False
    assert event.lost is not None and event.lost > 0 and event.lost == v.ledger.lost
    assert not outcome.ok


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda t: t.replace("PYTHON, mini.py", "no-such-program-xyz, mini.py"), ScenarioError, "not found"),
        (lambda t: t.replace("mini.py", "missing.py"), ServiceError, "exited with code"),
        (lambda t: t.replace("subscribed", "never printed", 1).replace("20s", "1s"), ServiceError, "not ready within"),
        (
            lambda t: t.replace('path: "{out_dir}/out.jsonl"', 'path: "{out_dir}/elsewhere/*.jsonl"'),
            ServiceError,
            "no file matches",
        ),
        (
            lambda t: t.replace("columns: {durable_at: at}", "columns: {seq: sequence}"),
            ServiceError,
            "no field 'sequence'",
        ),
        (
            lambda t: t.replace("columns: {durable_at: at}", "columns: {seq: machine}"),
            ServiceError,
            "field 'machine' holds no sequence id",
        ),
        (
            # Numbers, but not the bench's: its own write time, as a mapping to a row id or offset would be.
            lambda t: t.replace("columns: {durable_at: at}", "columns: {seq: at}"),
            ServiceError,
            "holds a seq the bench sent",
        ),
    ],
    ids=[
        "command-not-found",
        "exits-early",
        "never-ready",
        "output-empty",
        "column-missing",
        "seq-not-a-number",
        "seq-not-ours",
    ],
)
def test_user_mistakes_get_a_one_line_error(
    tmp_path: Path,
    write_scenario: Callable[[str], Path],
    edit: Callable[[str], str],
    error: type[Exception],
    message: str,
) -> None:
    path = _scenario(tmp_path, write_scenario, edit(SCENARIO))
    with pytest.raises(error, match=message) as caught:
        _run(path, tmp_path)
    first = str(caught.value).splitlines()[0]
    assert message in first, "the reason is on the first line; the system's output follows"


def test_exits_early_shows_its_last_output(tmp_path: Path, write_scenario: Callable[[str], Path]) -> None:
    path = _scenario(tmp_path, write_scenario, script="import sys\nprint('boom: no broker given')\nsys.exit(3)\n")
    with pytest.raises(ServiceError, match="exited with code 3") as caught:
        _run(path, tmp_path)
    assert "boom: no broker given" in str(caught.value)


@pytest.mark.parametrize(
    ("system", "message"),
    [
        ("{kind: external}", "kind external needs external"),
        (
            "{kind: external, external: {command: x, output: {format: jsonl, path: a}}}",
            "expected ready",
        ),
        (
            "{kind: external, external: {attach: true, command: x, output: {format: jsonl, path: a}}}",
            "remove command",
        ),
        (
            "{kind: external, external: {command: 'x {nope}', ready: {log: x}, output: {format: jsonl, path: a}}}",
            "unknown placeholder {nope}",
        ),
        ("{kind: external, external: {attach: true, output: {format: sql, url: 'sqlite:///x.db'}}}", "table or query"),
    ],
)
def test_external_settings_are_checked_before_anything_runs(
    write_scenario: Callable[[str], Path], system: str, message: str
) -> None:
    text = f"name: x\nphases: [{{kind: steady, rate: 10, duration: 1}}]\nsystem: {system}\n"
    with pytest.raises(ScenarioError, match=message):
        load_scenario(write_scenario(text))


SQLITE_MINI = """
import json, signal, sqlite3, sys, time
from urllib.parse import urlsplit
import paho.mqtt.client as mqtt

url, topic, db = sys.argv[1], sys.argv[2], sys.argv[3]
where = urlsplit(url)
con = sqlite3.connect(db, check_same_thread=False)
con.execute("CREATE TABLE IF NOT EXISTS readings (sequence_id INTEGER, machine TEXT, stored_at REAL)")
con.commit()

def on_message(client, userdata, msg):
    d = json.loads(msg.payload)
    con.execute("INSERT INTO readings VALUES (?, ?, ?)", (d["seq"], d["machine"], time.time()))
    con.commit()

def on_subscribe(client, userdata, mid, codes, props):
    print("sqlite-mini: subscribed", flush=True)

c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
c.on_message, c.on_subscribe = on_message, on_subscribe
c.on_connect = lambda client, userdata, flags, rc, props: client.subscribe(topic, qos=1)
c.connect(where.hostname, where.port)
signal.signal(signal.SIGTERM, lambda *a: (c.disconnect(), con.close(), sys.exit(0)))
c.loop_forever()
"""


def test_an_external_pipeline_writing_sql_is_read_back_by_seq(
    tmp_path: Path, write_scenario: Callable[[str], Path]
) -> None:
    """Its own table, its own column names: the mapping says which holds the seq and the durable time."""
    text = SCENARIO.replace('"{out_dir}/out.jsonl"]', '"{out_dir}/own.db"]').replace(
        'output: {format: jsonl, path: "{out_dir}/out.jsonl", columns: {durable_at: at}}',
        'output: {format: sql, url: "sqlite:///{out_dir}/own.db", table: readings, '
        "columns: {seq: sequence_id, durable_at: stored_at}}",
    )
    outcome = _run(_scenario(tmp_path, write_scenario, text, SQLITE_MINI), tmp_path)
    assert outcome.ok, outcome.problems()
    v = outcome.results.variants[0]
    assert v.ledger.persisted == v.ledger.sent == 400
    assert v.system is not None and v.system.durable_from == "column"


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("example", ["python-takehome", "node-jsonl"])
def test_the_shipped_examples_reconcile(example: str, tmp_path: Path) -> None:
    """The examples the README points at, from their own scenario files (shortened): the Node.js one installs
    its npm packages on first use (run.sh)."""
    if example == "node-jsonl" and (shutil.which("node") is None or shutil.which("npm") is None):
        reason = "node and npm are not installed (examples/node-jsonl needs them)"
        if os.environ.get("BENCH_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{reason}; BENCH_REQUIRE_SERVICES=1 requires them", pytrace=False)
        pytest.skip(reason)
    loaded = load_scenario(EXAMPLES / example / "scenario.yaml")
    outcome = runner.run(loaded, runner.RunOptions(out=tmp_path / "run", messages=1500, calibrate=False))
    assert outcome.ok, outcome.problems()
    assert outcome.ledger.persisted == outcome.ledger.sent == 1500


def test_two_commands_side_by_side_in_one_run(tmp_path: Path, write_scenario: Callable[[str], Path]) -> None:
    """A matrix of commands (the user's main against their branch): each variant starts its own."""
    text = SCENARIO + (
        "matrix:\n"
        "  - {name: main}\n"
        "  - {name: branch, system.external.command: [PYTHON, mini.py, '{broker_url}', '{topic}', "
        "'{out_dir}/b.jsonl'], system.external.output.path: '{out_dir}/b.jsonl'}\n"
    )
    outcome = _run(_scenario(tmp_path, write_scenario, text), tmp_path)
    assert outcome.ok, outcome.problems()
    assert [v.name for v in outcome.results.variants] == ["main", "branch"]
    assert (tmp_path / "run" / "main" / "out.jsonl").exists() and (tmp_path / "run" / "branch" / "b.jsonl").exists()


def test_its_rejects_are_read_with_their_reasons_and_a_torn_last_line_is_named(tmp_path: Path) -> None:
    """Watching a JSON lines output: whole lines only while it runs; at the end, a torn last line is a problem
    the results name (a crash mid-write), and each reject keeps the reason the system gave."""
    from bench.harness.external_sut import _Watcher
    from bench.scenario import RejectsSettings
    from pipeline.clock import FakeClock

    out = RejectsSettings(format="jsonl", path=str(tmp_path / "rejected.jsonl"), reason="why")
    (tmp_path / "rejected.jsonl").write_text(
        '{"seq": 4, "why": "bad_value"}\n{"seq": 9}\n{"seq": 11, "why": "fut', encoding="utf-8"
    )
    watcher = _Watcher(out, out.path or "", FakeClock())
    watcher.poll(final=False)
    assert watcher.rows.seqs == [4, 9] and watcher.rows.unreadable == []
    watcher.poll(final=True)
    assert watcher.rows.seqs == [4, 9], "the torn line is not a row"
    assert watcher.rows.reasons == ["bad_value", "rejected"]
    (problem,) = watcher.rows.unreadable
    assert "last line is incomplete" in problem


# A pipeline that drops every payload field it does not know (seq among them) but keeps the topic.
TOPIC_MINI = MINI.replace(
    '{"seq": d["seq"], "machine": d["machine"], "at": time.time()}',
    '{"topic": msg.topic, "machine": d["machine"], "at": time.time()}',
)


def test_the_seq_can_travel_in_the_topic(tmp_path: Path, write_scenario: Callable[[str], Path]) -> None:
    text = SCENARIO.replace(
        "transport: {kind: mqtt, mqtt: {qos: 1}}",
        "transport: {kind: mqtt, mqtt: {qos: 1, topic: 'plant/{machine}/telemetry/{seq}'}}",
    ).replace("columns: {durable_at: at}", "columns: {seq: topic, seq_pattern: '/(\\d+)$', durable_at: at}")
    outcome = _run(_scenario(tmp_path, write_scenario, text, TOPIC_MINI), tmp_path)
    assert outcome.ok, outcome.problems()
    assert outcome.ledger.persisted == outcome.ledger.sent == 400
