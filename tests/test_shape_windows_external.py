"""The windows shape's standalone pipeline (``python -m pipeline.windows``), external pipelines run through the
bench (``windows.external``), and the freshness figure (window emitted minus window end on the virtual clock).

No assert reads a wall-clock or CPU time: the feed is seeded, the external pipelines' outputs are deterministic,
and the only timing is the generous start and stop timeouts of ShapeProcess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.errors import ScenarioError
from bench.harness.progress import Progress
from bench.harness.runner import RunOptions, run
from bench.scenario import load_scenario
from bench.shapes.windows import arrivals, diff, measure, oracle, read_back, summary_lines
from bench.shapes.windows_settings import WindowsSettings
from pipeline.windows import parse_reading
from simulators.stream import PhaseSpec, StreamSpec
from tests.conftest import ROOT

S = 1_000_000_000
EPOCH = 1_700_000_000 * S
SPEC = StreamSpec(
    seed=5,
    machines=("m0", "m1", "m2"),
    phases=(PhaseSpec("steady", 40, 30.0), PhaseSpec("burst", 3, 300.0), PhaseSpec("steady", 40, 30.0)),
)
SETTINGS = WindowsSettings(windows=(5.0, 20.0), late_fraction=0.05, consumer_rate=60, memory_windows=(10.0,))


def _cli(*flags: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.windows", *flags],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("strategy", ["naive", "improved"])
def test_the_standalone_pipeline_equals_the_oracle(tmp_path: Path, strategy: str) -> None:
    """The seeded arrivals (5 % held back up to 5 s, so some are late) through ``python -m pipeline.windows``:
    every window value equals the oracle's, each once, and its late count is the oracle's."""
    items = arrivals(SPEC, SETTINGS, EPOCH)
    out = tmp_path / "windows.jsonl"
    flags = ["--windows", "5s,20s", "--slide", "1s", "--allowed-lateness", "2s", "--strategy", strategy]
    done = _cli(*flags, "--out", str(out), stdin=b"".join(a.payload + b"\n" for a in items))
    assert done.returncode == 0, done.stderr
    back = read_back(out)
    expected, late = oracle([(a.machine, a.ts_ns, a.value) for a in items], (5 * S, 20 * S), S, 2 * S)
    found = diff(back.values, expected)
    assert found.count == 0, found.sample()
    counts = {"readings": len(items), "accepted": len(items) - late, "late": late, "invalid": 0}
    assert late > 0 and back.counts == counts
    assert not back.bad and b"late=" in done.stderr


def test_the_standalone_pipeline_skips_bad_lines_and_refuses_bad_flags() -> None:
    lines = b'{"machine":"a","ts":"2026-01-01T01:00:00+01:00","load_rate":2,"seq":0}\nnot json\n{"machine":"a"}\n'
    done = _cli("--windows", "1s", stdin=lines)
    assert done.returncode == 0
    values = [json.loads(x) for x in done.stdout.splitlines()]
    # +01:00 is midnight UTC: the one reading's window [0 s, 1 s) of 2026-01-01 ends at 00:00:01Z.
    first = {"end_ns": 1_767_225_601 * S, "machine": "a", "window_s": 1.0, "count": 1, "mean": 2.0, "max": 2.0}
    assert values[0] == first
    assert values[-1] == {"readings": 3, "accepted": 1, "late": 0, "invalid": 2}
    assert done.stderr.count(b"skipped") == 2
    for flags, message in [
        (("--windows", "0s"), b"--windows: 0s is not above zero"),
        (("--windows", "10s", "--slide", "20s"), b"--slide: 20s is larger than the window 10s"),
        (("--windows", "10s,1m", "--slide", "4s"), b"--windows: 10s is not a multiple of --slide 4s"),
        (("--slide=-1s",), b"--slide: -1s is not above zero"),
        (("--allowed-lateness=-2s",), b"--allowed-lateness: -2s is negative"),
        (("--windows", "ten"), b"--windows: 'ten' is not a duration"),
    ]:
        bad = _cli(*flags, stdin=b"")
        assert bad.returncode == 2 and message in bad.stderr, (flags, bad.stderr)


def test_parse_reading_keeps_microseconds_across_offsets() -> None:
    a = parse_reading(b'{"machine":"m","ts":"2026-01-01T00:00:00.000001Z","load_rate":1.5}', "load_rate")
    b = parse_reading(b'{"machine":"m","ts":"2025-12-31T19:00:00.000001-05:00","load_rate":1.5}', "load_rate")
    assert a == b == ("m", 1_767_225_600 * S + 1000, 1.5)
    with pytest.raises(ValueError, match="no zone"):
        parse_reading(b'{"machine":"m","ts":"2026-01-01T00:00:00","load_rate":1}', "load_rate")


# ----------------------------------------------------------------------------- through bench run

SCENARIO = """name: win-ext
seed: 7
machines: {{count: 2}}
phases:
  - {{kind: steady, rate: 20, duration: 40s}}
pipeline: {{buffer: {{size: 40, capacity: 40}}}}
windows:
  windows: [5s, 20s]
  consumer_rate: 50
  late_fraction: 0.05
  policies: [block]
  strategies: [improved]
  memory_windows: [10s]
  external:
{externals}
"""


def _entry(name: str, command: str) -> str:
    return f"    - {{name: {name}, cwd: {json.dumps(str(ROOT))}, env: {{PYTHONPATH: {json.dumps(str(ROOT))}}}, " + (
        f"command: {json.dumps(command)}}}"
    )


BUILTIN = "{python} -m pipeline.windows --windows 5s,20s --allowed-lateness 2s --out {dir}/windows.jsonl"
WRONG = "{python} tests/data/windows_wrong_pipeline.py --windows 5,20 --out {dir}/windows.jsonl"


def test_external_pipelines_right_and_wrong(tmp_path: Path, write_scenario: Callable[[str], Path]) -> None:
    """The built-in as a process: 0 mismatches, a reconciled ledger from its own output; the pipeline that ignores
    the watermark: mismatches, each of them a window with late readings counted in, and the run fails."""
    path = write_scenario(SCENARIO.format(externals=_entry("builtin", BUILTIN) + "\n" + _entry("wrong", WRONG)))
    seen: list[Progress] = []
    outcome = run(load_scenario(path), RunOptions(out=tmp_path / "run", calibrate=False), on_progress=seen.append)
    by_name = {v.name: v for v in outcome.results.variants}
    assert list(by_name) == ["improved-block", "builtin", "wrong"]
    good, bad = by_name["builtin"].windows, by_name["wrong"].windows
    assert good is not None and bad is not None and good.external is not None and bad.external is not None
    assert good.mismatches == 0 and good.expected > 0 and good.late == good.oracle_late > 0
    assert good.external.exit_code == 0 and good.external.sent == outcome.ledgers["builtin"].sent
    assert good.external.readings_counted == good.external.sent - good.oracle_late
    assert outcome.ledgers["builtin"].reconciled and not outcome.errors["builtin"]
    assert good.external.cpu_s_exact is not None and good.external.wall_us_per_reading is not None
    # The wrong one sees the same readings; its extra readings are exactly the oracle's late ones.
    assert bad.mismatches > 0 and bad.mismatch_kinds is not None and bad.mismatch_kinds.wrong > 0
    assert bad.external.late_counted_in == bad.mismatches - bad.mismatch_kinds.missing
    assert bad.external.readings_counted == bad.external.sent
    assert not outcome.ok and any("mismatch(es) with the oracle" in e for e in outcome.errors["wrong"])
    assert any("late readings: it counted 0" in e for e in outcome.errors["wrong"])
    lines = summary_lines(outcome.results.variants)
    assert any(line.startswith("builtin (external): 0 mismatch(es)") for line in lines)
    # Progress: every step (sweep, built-in variant, two externals) heard of, in order.
    assert sorted({p.variant_index for p in seen}) == list(range(4)) and {p.variants for p in seen} == {4}
    assert (tmp_path / "run" / "wrong" / "system.log").exists()


def test_a_pipeline_that_exits_is_named_in_one_line(tmp_path: Path, write_scenario: Callable[[str], Path]) -> None:
    """Exiting as it starts: one line naming the exit code (a failure of that variant when it was gone within the
    start check's 50 ms, else an early exit: a loaded machine can start Python slower than that). Exiting while
    the bench still writes: "exited early ... after K of M readings". It reads nothing, so the bench's writes fill
    the pipe (64 KiB, ~650 readings of 4,000) and break when it exits."""
    at_start = '{python} -c "import sys; sys.exit(3)"'
    half_way = '{python} -c "import sys, time; time.sleep(0.5); sys.exit(4)"'
    text = SCENARIO.format(externals=_entry("dead", at_start) + "\n" + _entry("quits", half_way))
    path = write_scenario(text.replace("rate: 20, duration: 40s", "rate: 100, duration: 40s"))
    outcome = run(load_scenario(path), RunOptions(out=tmp_path / "run", calibrate=False))
    assert not outcome.ok
    dead = [outcome.failures["dead"]] if "dead" in outcome.failures else outcome.errors["dead"]
    assert any(("exited with code 3" in e or "exited early (code 3)" in e) and "\n" not in e for e in dead), dead
    errors = outcome.errors["quits"]
    assert any("exited early (code 4) after" in e and "of 4,000 readings" in e and "\n" not in e for e in errors), (
        errors
    )


def test_a_command_not_found_is_a_one_line_scenario_error(
    tmp_path: Path, write_scenario: Callable[[str], Path]
) -> None:
    path = write_scenario(SCENARIO.format(externals=_entry("nothere", "no-such-windows-pipeline --out {dir}/x")))
    with pytest.raises(ScenarioError) as info:
        run(load_scenario(path), RunOptions(out=tmp_path / "run", calibrate=False))
    message = str(info.value)
    assert "windows.external[0].command: 'no-such-windows-pipeline' not found" in message and "\n" not in message


@pytest.mark.parametrize(
    ("externals", "expected"),
    [
        ("[{name: improved-block, command: x}]", "external[0].name: 'improved-block' is already a variant's name"),
        ("[{name: a, command: x}, {name: a, command: y}]", "external[1].name: 'a' is already a variant's name"),
    ],
)
def test_external_names_must_be_unique(write_scenario: Callable[[str], Path], externals: str, expected: str) -> None:
    path = write_scenario(
        "name: x\nphases:\n  - {kind: steady, rate: 10, duration: 2s}\n"
        f"windows: {{strategies: [improved], policies: [block], external: {externals}}}\n"
    )
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- freshness


def test_block_keeps_every_reading_but_delays_windows() -> None:
    """Under the burst (300/s for 3 s into a consumer of 60/s), block makes windows come out later than either drop
    policy does; no window comes out before its end plus the allowed lateness (the watermark's floor)."""
    outcomes = {o.name: o.result["windows"] for o in measure(SPEC, SETTINGS, capacity=50)}
    lateness = SETTINGS.allowed_lateness
    for name, part in outcomes.items():
        delay = part["emit_delay"]
        assert delay["p50_s"] >= lateness and delay["p50_s"] <= delay["p99_s"] <= delay["max_s"], name
    for strategy in ("naive", "improved"):
        block = outcomes[f"{strategy}-block"]["emit_delay"]
        for policy in ("drop_oldest", "drop_newest"):
            dropping = outcomes[f"{strategy}-{policy}"]["emit_delay"]
            # ~900 burst rows at 60/s: block's backlog lasts > 10 s; a drop policy's buffer holds < 1 s of rows.
            assert block["max_s"] > dropping["max_s"] + 5, (strategy, policy, block, dropping)
    # The engines differ in CPU, not in when the (virtual) consumer emits: the same delays for both.
    assert outcomes["naive-block"]["emit_delay"] == outcomes["improved-block"]["emit_delay"]
