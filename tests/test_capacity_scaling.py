"""How a capacity sweep says whether more pipeline workers add throughput, and what stops them: the limit line,
the scaling read-out (growth from one worker, cores as the limit), the generator's ceiling beside the system's."""

from __future__ import annotations

import copy
import itertools
import json
import os
import socket
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.capacity import model
from bench.capacity.display import scaling_lines, scaling_table
from bench.capacity.sweep import local_broker
from bench.report.render import write_report
from bench.results.model import Capacity
from bench.scenario import load_scenario

DATA = Path(__file__).parent / "data" / "results"
SCENARIOS = Path(__file__).parent.parent / "scenarios"


def step(offered: float, verdict: str = "unsustainable", *, workers: int = 1, **cpu: Any) -> dict[str, Any]:
    """A judged step with the CPU figures under test (100 = one core; machine: 100 = every core)."""
    per_worker = cpu.get("per_worker")
    return {
        "offered_per_s": offered,
        "verdict": verdict,
        "sustainable": verdict == "sustainable",
        "send_lag_p99_ms": 3.0,
        "workers": workers,
        "cpu_pct": None if per_worker is None else per_worker * workers,
        "cpu_pct_per_worker": per_worker,
        "publisher_cpu_pct": cpu.get("publishers"),
        "broker_cpu_pct": cpu.get("broker"),
        "bench_process_cpu_pct": cpu.get("bench"),
        "machine_cpu_pct": cpu.get("machine"),
        "generator_limited": cpu.get("generator_limited"),
        "lost": cpu.get("lost", 0),
        "backlog_growing": cpu.get("backlog_growing", True),
    }


def series(workers: int, steps: list[dict[str, Any]], generator: dict[str, Any] | None = None) -> dict[str, Any]:
    """A series as sweep._series makes it, with the limit from model.limit_of on 2 cores."""
    kind, limit = model.limit_of(steps, generator=generator, cores=2, broker="broker (mosquitto pid 1)")
    ok = [s for s in steps if s["sustainable"]]
    return {
        "workers": workers,
        "steps": steps,
        "limit": limit,
        "limit_kind": kind,
        "sustainable_per_s": max((s["offered_per_s"] for s in ok), default=None),
        "peak_per_s": max((s["offered_per_s"] for s in steps), default=None),
        "saturated": kind is not None,
    }


PLAN = model.generator_plan(ceiling_per_s=13_000, publishers=2, highest_rate=8000, qos=1, cores=2, source="c.json")


# ----------------------------------------------------------------------------- the limit line


def test_all_cores_busy_with_the_sweeps_own_processes_says_cores_are_the_limit() -> None:
    busy = step(4000, workers=2, per_worker=60, publishers=50, broker=20, bench=5, machine=98)
    kind, line = model.limit_of([busy], cores=2, broker="broker (mosquitto pid 1)")
    assert kind == "cores" and line is not None
    assert line.startswith("the machine's cores") and "cores are the limit" in line
    # The evidence: each role's share, and how much of the machine was the sweep's.
    assert "2 pipeline workers 60% of a core each" in line and "broker (mosquitto pid 1) 20%" in line
    assert "the sweep's processes 1.9 of 2 cores" in line and "other processes 0.0" in line
    assert "quieter machine" not in line


def test_one_busy_worker_with_cores_to_spare_is_the_pipeline() -> None:
    kind, line = model.limit_of([step(3000, per_worker=97, publishers=40, broker=15, bench=5, machine=80)], cores=2)
    assert kind == "pipeline" and line is not None and line.startswith("the pipeline's CPU")
    assert "every core" not in line
    kind, line = model.limit_of([step(3000, per_worker=97, publishers=60, broker=30, bench=5, machine=96)], cores=2)
    assert kind == "pipeline" and line is not None and "every core was busy too" in line


def test_cores_taken_by_other_processes_are_said_to_be_others() -> None:
    kind, line = model.limit_of([step(2000, per_worker=38, publishers=64, broker=10, bench=4, machine=99)], cores=2)
    assert kind == "cores" and line is not None
    assert "other processes 0.8" in line and "rerun on a quieter machine" in line
    # Without the broker's figure the rest is not others' alone: it says so and gives no advice on it.
    kind, line = model.limit_of([step(2000, per_worker=38, publishers=64, machine=99)], cores=2)
    assert kind == "cores" and line is not None
    assert "other processes and the unmeasured broker and bench 1.0" in line and "quieter" not in line


def test_no_busy_core_says_the_sweep_cannot_tell() -> None:
    kind, line = model.limit_of([step(2000, per_worker=40, publishers=30, broker=10, bench=2, machine=45)], cores=2)
    assert kind == "unknown" and line is not None and "cannot tell" in line


def test_a_step_that_kept_up_but_lost_messages_says_so() -> None:
    lossy = step(3000, per_worker=60, publishers=45, broker=15, bench=5, machine=95, lost=144, backlog_growing=False)
    _, line = model.limit_of([lossy], cores=2)
    assert line is not None and "kept up but lost 144 message(s)" in line


def test_past_the_calibrated_ceiling_the_generator_is_named_whatever_the_cores() -> None:
    plan = model.generator_plan(ceiling_per_s=1000, publishers=1, highest_rate=4000, qos=1, cores=2, source="c")
    hot = step(2000, per_worker=60, publishers=99, broker=20, bench=5, machine=99, generator_limited=True)
    kind, line = model.limit_of([hot], generator=plan, cores=2)
    assert kind == "generator" and line is not None and line.startswith("the load generator")


# ----------------------------------------------------------------------------- the scaling read-out


def two_counts() -> list[dict[str, Any]]:
    """One worker held by its own CPU at 4,000 msg/s; two workers by the cores at 5,000."""
    one = [step(3000, "sustainable", per_worker=75), step(4000, per_worker=96, publishers=40, broker=15, machine=80)]
    two = [
        step(3000, "sustainable", workers=2),
        step(4000, "sustainable", workers=2),
        step(5000, workers=2, per_worker=55, publishers=50, broker=22, bench=6, machine=97),
    ]
    return [series(1, one, PLAN), series(2, two, PLAN)]


def test_growth_from_one_worker_and_cores_as_the_limit_are_stated() -> None:
    sc = model.scaling(two_counts(), generator=PLAN, cores=2)
    one, two = sc["rows"]
    assert (one["limit_kind"], two["limit_kind"]) == ("pipeline", "cores")
    assert two["vs_one_worker"] == round(4000 / 3000, 3)
    assert "1 worker 3,000 msg/s; 2 workers 4,000 msg/s (1.33x one worker" in sc["growth"]
    statement = sc["statement"]
    assert statement.startswith("2 workers sustained 1.33x one worker's rate")
    assert "cores are the limit" in statement and "at 2 workers' first failing step (5,000 msg/s)" in statement
    assert "the machine's 2 cores were 97% busy" in statement and "more workers cannot add throughput" in statement
    # The generator's ceiling stands beside each count's sustained rate: 2 processes x 13,000 msg/s.
    assert [r["generator_ceiling_per_s"] for r in sc["rows"]] == [26_000, 26_000]
    assert two["cpu"]["sweep_pct"] == 55 * 2 + 50 + 22 + 6


def test_no_growth_when_one_worker_was_already_held_by_the_cores() -> None:
    held = [step(2000, "sustainable"), step(3000, per_worker=50, publishers=60, broker=20, bench=5, machine=95)]
    same = [step(2000, "sustainable", workers=2), step(3000, workers=2, per_worker=30, publishers=60, machine=96)]
    sc = model.scaling([series(1, held), series(2, same)], generator=None, cores=2)
    assert "2 workers sustained no more than one worker (1.00x)" in sc["statement"]
    assert "cores are the limit" in sc["statement"] and "one worker's limit was the cores too" in sc["statement"]
    assert sc["generator_ceiling_per_s"] is None


def test_a_count_that_never_failed_or_a_generator_limit_cannot_tell() -> None:
    one = [step(2000, "sustainable"), step(3000, per_worker=95, publishers=30, machine=70)]
    unbounded = [step(2000, "sustainable", workers=2), step(3000, "sustainable", workers=2)]
    sc = model.scaling([series(1, one), series(2, unbounded)], generator=None, cores=2)
    assert "raise capacity.rates" in sc["statement"] and sc["rows"][1]["limit_kind"] is None
    gen = [step(2000, "sustainable", workers=2), step(30_000, workers=2, per_worker=50, generator_limited=True)]
    sc = model.scaling([series(1, one, PLAN), series(2, gen, PLAN)], generator=PLAN, cores=2)
    assert "the load generator was the limit" in sc["statement"] and "cannot tell" in sc["statement"]


def test_without_two_counts_or_a_sustainable_first_count_nothing_is_claimed() -> None:
    one = [step(2000, "sustainable"), step(3000, per_worker=95, publishers=30, machine=70)]
    single = model.scaling([series(1, one)], generator=PLAN, cores=2)
    assert single["growth"] is None and single["statement"] is None
    assert single["rows"][0]["generator_ceiling_per_s"] == 26_000
    failed = [step(2000, per_worker=95, publishers=30, machine=70)]
    sc = model.scaling([series(1, failed), series(2, one)], generator=None, cores=2)
    assert sc["statement"].startswith("cannot tell how throughput grows")


# ----------------------------------------------------------------------------- where it is shown


def test_the_terminal_shows_the_generators_ceiling_beside_the_sustained_rate() -> None:
    sc = model.scaling(two_counts(), generator=PLAN, cores=2)
    cap = Capacity.model_validate({"scaling": {**sc, "broker_process": "broker (mosquitto pid 1)"}})
    table = scaling_table(cap)
    assert table is not None
    console = Console(record=True, width=300)
    console.print(table)
    text = console.export_text()
    rows = [line for line in text.splitlines() if "26,000" in line]
    assert len(rows) == 2, text
    assert "3,000" in rows[0] and "4,000" in rows[1] and "1.33x" in rows[1] and "cores" in rows[1]
    lines = scaling_lines(cap)
    assert any("cores are the limit" in line for line in lines)
    assert scaling_table(Capacity()) is None and scaling_lines(Capacity()) == []


def test_the_report_shows_the_ratio_the_ceiling_and_the_cpu_at_the_limit(tmp_path: Path) -> None:
    results = json.loads((DATA / "v12-capacity.json").read_text(encoding="utf-8"))
    base = results["capacity"]["series"][0]
    made = two_counts()
    results["capacity"]["series"] = [
        {**copy.deepcopy(base), **{k: v for k, v in s.items() if k != "steps"}} for s in made
    ]
    results["capacity"]["generator"] = PLAN
    results["capacity"]["scaling"] = model.scaling(made, generator=PLAN, cores=2)
    (tmp_path / "results.json").write_text(json.dumps(results), encoding="utf-8")
    html = write_report([tmp_path]).html.read_text(encoding="utf-8")
    start = html.index('id="table-capacity-summary"')
    summary = html[start : html.index("</table>", start)]
    for header in ("x 1 worker", "generator ceiling msg/s", "CPU at the limit"):
        assert f">{header}<" in summary
    assert summary.count(">26,000<") == 2 and ">1.33x<" in summary
    assert "bench 6%, other processes 6%; machine 97% of all 2 cores" in summary
    section = html[start : html.index("</section>", start)]
    assert "Scaling: 2 workers sustained 1.33x" in section and "cores are the limit" in section


def test_cores_taken_by_other_processes_are_named_in_the_statement() -> None:
    # The shape of a sweep on a shared 2-core machine: the sweep's own processes far from both cores.
    one = [step(2121, "sustainable"), step(2523, per_worker=44, publishers=41, broker=10, bench=0.5, machine=99.5)]
    two = [
        step(3568, "sustainable", workers=2),
        step(4243, workers=2, per_worker=37, publishers=47, broker=14, bench=0.3, machine=99.8),
    ]
    sc = model.scaling([series(1, one), series(2, two)], generator=None, cores=2)
    assert "2 workers sustained 1.68x one worker's rate" in sc["statement"]
    assert "cores are the limit" in sc["statement"] and "other processes 0.6" in sc["statement"]
    assert "rerun on a quieter machine" in sc["statement"]


# ----------------------------------------------------------------------------- the broker's CPU, the scenario


def test_a_broker_on_this_machine_is_found_by_its_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        found = local_broker(f"mqtt://127.0.0.1:{port}")
    assert found is not None and found[0] == os.getpid()
    # TEST-NET-1 (RFC 5737) is never this machine: its broker's CPU is not ours to measure.
    assert local_broker("mqtt://192.0.2.1:1883") is None


def test_the_shipped_workers_scenario_sweeps_one_and_two_workers_on_a_v5_broker() -> None:
    cap = load_scenario(SCENARIOS / "capacity-workers.yaml").scenario
    assert cap.capacity is not None and list(cap.capacity.workers) == [1, 2]
    assert cap.transport.mqtt.broker.startswith("mqtt://")
    rates = cap.capacity.step_rates()
    assert max(b / a for a, b in itertools.pairwise(rates)) < 1.2
