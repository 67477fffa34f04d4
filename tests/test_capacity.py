"""bench capacity end to end: real publisher and pipeline worker processes, a real broker, read-back from Parquet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.capacity.pipeline_worker import rss_bytes
from bench.capacity.sweep import _variant, machine_busy_s, process_cpu_s
from bench.cli import main
from bench.report.render import PLOT_IDS
from bench.results.metrics import parquet_flush_triggers
from bench.results.model import Latency, Results, Variant, read_results
from bench.scenario import load_scenario
from pipeline.buffer import LockProbes
from pipeline.model import FlushStat
from tests.conftest import SCENARIOS

SMALL = """
name: cap-small
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
  publishers: 2
  target_rate: 1000
"""


@dataclass(frozen=True)
class SmallRun:
    run_dir: Path
    results: Results
    exit_code: int


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> SmallRun:
    """Through the CLI, as a user runs it: the report must land in the run folder too."""
    folder = tmp_path_factory.mktemp("cap")
    path = folder / "cap.yaml"
    path.write_text(SMALL, encoding="utf-8")
    code = main(["capacity", str(path), "--out", str(folder / "run"), "--quiet"])
    return SmallRun(folder / "run", read_results(folder / "run"), code)


def test_a_small_sweep_finds_a_sustainable_rate_with_its_evidence(small_run: SmallRun) -> None:
    assert small_run.exit_code == 0
    cap = small_run.results.capacity
    assert cap is not None
    (series,) = cap.series
    assert [s.offered_per_s for s in series.steps] == [100, 200]
    for step in series.steps:
        # Far below any limit of this machine: both steps are sustainable, every message read back from disk.
        assert step.verdict == "sustainable", step
        assert step.ledger is not None and step.ledger.reconciled and step.ledger.lost == 0
        assert step.sent == step.ledger.persisted == int(step.offered_per_s * 3)
        assert step.achieved_ratio is not None and step.achieved_ratio >= 0.98
        assert step.latency_ms is not None and step.latency_ms.end_to_end is not None
        assert step.latency_ms.end_to_end.count > 0
        assert step.flush_ms is not None and step.flush_ms.count > 0
        assert step.cpu_pct is not None and step.cpu_pct > 0 and step.rss_mb is not None and step.rss_mb > 10
        assert step.timeline is not None and step.timeline.t_s and step.timeline.backlog is not None
        assert len(step.timeline.backlog) == len(step.timeline.t_s)
    assert series.sustainable_per_s == 200
    assert cap.usl is None  # one worker count: nothing to fit
    assert {r.topic for r in cap.recommendations} >= {"workers", "flush interval", "buffer size"}
    # Two publisher processes each sent a share; together every seq once.
    assert series.steps[0].dir is not None
    step_dir = small_run.run_dir / series.steps[0].dir
    shares = [json.loads((step_dir / f"publisher-{p}.json").read_text())["sent"] for p in (0, 1)]
    assert all(n > 0 for n in shares) and sum(shares) == 300


def test_results_carry_a_run_shaped_variant_per_worker_count(small_run: SmallRun) -> None:
    (variant,) = small_run.results.variants
    assert variant.name == "workers-1"
    assert variant.ledger.reconciled
    assert any(stats is not None for stats in parquet_flush_triggers(variant)), "the Parquet sink's flushes"
    assert variant.timeline is not None and variant.timeline.t_s and variant.timeline.durable


def test_a_capacity_run_writes_its_report(small_run: SmallRun) -> None:
    html = small_run.run_dir / "report.html"
    assert html.exists() and (small_run.run_dir / "summary.md").exists()
    text = html.read_text(encoding="utf-8")
    for section in ("plot-capacity", "plot-capacity-latency", "table-capacity", "table-recommendations"):
        assert f'id="{section}"' in text


def test_more_workers_on_the_embedded_broker_is_refused_with_the_reason(
    write_scenario: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_scenario(SMALL)
    assert main(["capacity", str(path), "--workers", "1,2", "--out", str(path.parent / "o")]) == 2
    err = capsys.readouterr().err
    assert "shared subscriptions" in err and "--broker mqtt://127.0.0.1:1883" in err
    assert "Traceback" not in err


def test_a_scenario_without_a_capacity_section_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["capacity", str(SCENARIOS / "burst.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "burst.yaml" in err and "capacity: missing" in err


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("{rates: [200, 100], step: 3s}", "strictly rising"),
        ("{rates: [100], ramp: {from: 1, to: 2, steps: 2}}", "exactly one of"),
        ("{rates: [100], step: 2s, settle: 2s}", "settle: expected less than step"),
        ("{ramp: {from: 500, to: 100, steps: 3}}", "to: expected more than from"),
    ],
)
def test_bad_capacity_sections_name_the_field(
    section: str, expected: str, write_scenario: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    text = SMALL.split("capacity:", maxsplit=1)[0] + f"capacity: {section}\n"
    path = write_scenario(text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "capacity" in err and expected in err


def test_the_shipped_capacity_scenario_validates() -> None:
    loaded = load_scenario(SCENARIOS / "capacity.yaml")
    assert loaded.scenario.capacity is not None
    assert len(loaded.scenario.capacity.step_rates()) >= 4


@pytest.mark.services
def test_two_workers_share_the_subscription_on_mosquitto_and_a_usl_is_fitted(
    mosquitto_url: str, write_scenario: Callable[..., Path]
) -> None:
    path = write_scenario(SMALL)
    out = path.parent / "run"
    argv = ["capacity", str(path), "--out", str(out), "--broker", mosquitto_url, "--workers", "1,2", "--quiet"]
    code = main([*argv, "--rates", "300"])
    cap = read_results(out).capacity
    assert cap is not None
    series = cap.series
    assert [s.workers for s in series] == [1, 2]
    # Exit 1 is allowed for one reason only: with another job loading both cores, the publisher process can
    # miss its own pacing (send lag p99 over 250 ms, a wall-time threshold) and the step is publisher-limited.
    # Anything else that fails the sweep (a loss, an unsustainable pipeline at 300 msg/s) fails this test.
    verdicts = {step.verdict for s in series for step in s.steps}
    assert code == 0 or verdicts <= {"sustainable", "publisher-limited"}, verdicts
    two = series[1].steps[0]
    assert two.ledger is not None and two.ledger.reconciled and two.ledger.persisted == 900
    # The broker split the stream between the two workers: each received a real share, none got everything.
    assert two.dir is not None
    step_dir = out / two.dir
    received = [json.loads((step_dir / f"worker-{w}" / "final.json").read_text())["received"] for w in (0, 1)]
    assert sum(received) == 900 and min(received) > 100, received
    fit = cap.usl
    if code == 0:  # a publisher-limited step has no sustainable point to fit
        assert fit is not None and fit.points[0][0] == 1 and fit.points[1][0] == 2
    # The run's own report: every plot drawn from this real sweep, the USL included.
    html = (out / "report.html").read_text(encoding="utf-8")
    for plot in PLOT_IDS if code == 0 else [p for p in PLOT_IDS if p != "plot-usl"]:
        section = html.split(f'id="{plot}"', 1)[1].split("</section>", 1)[0]
        assert "data:image/png;base64," in section, plot


def test_bench_report_prints_the_markdown_summary_for_a_ci_job(
    small_run: SmallRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(small_run.run_dir), "--out", str(tmp_path), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out == (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "### Recommendations" in out and "| " in out
    assert (tmp_path / "report.html").exists()


def _step(rate: float, sustainable: bool, sent: int) -> dict[str, Any]:
    ledger = {"sent": sent, "persisted": sent, "rejected": 0, "dropped": 0, "lost": 0, "duplicates": 0}
    return {
        "offered_per_s": rate,
        "sent_per_s": rate,
        "persisted_per_s": rate if sustainable else rate / 3,
        "sustainable": sustainable,
        "ledger": {**ledger, "reconciled": True},
        "latency_ms": {"end_to_end": {"count": sent}},
        "timeline": {"t_s": [0.0], "sent": [0], "durable": [0]},
        "dir": f"workers-1/step-{rate:g}",
    }


def _flushes(count: int, total_ms: float) -> list[FlushStat]:
    return [
        FlushStat("parquet", i, "size", 100, 0, 0, int(total_ms * 1e6), 0, 0, bytes_before=i * 1000, rows_before=i)
        for i in range(count)
    ]


def _locks(puts: int) -> LockProbes:
    locks = LockProbes.new()
    for _ in range(puts):
        for rec in (locks.wait, locks.hold, locks.stall):
            rec.record_ns(2_000)
    return locks


def test_a_capacity_variants_figures_cover_the_steps_its_ledger_does() -> None:
    """The issue's report: ledger sent 126,746 beside a lock plot of n=186,746, and a flush p99 of 165.8 ms
    beside the step table's 53.4 ms: the overloaded step's puts and slow flushes were in the probes, not in
    the ledger. Now the ledger, lock and flush figures cover the same, sustainable, steps."""
    sc = load_scenario(SCENARIOS / "capacity.yaml").scenario
    steps = [_step(500, True, 5_000), _step(1_000, True, 10_000), _step(4_000, False, 60_000)]
    every = [_flushes(8, 10.0), _flushes(8, 12.0), _flushes(30, 160.0)]
    # After the settle time: the step table's population; the first flush of each step is in the warm-up.
    steady = [fs[1:] for fs in every]
    locks = [_locks(s["ledger"]["sent"]) for s in steps]
    series = {"sustainable_step": 1}
    built = _variant(sc, workers=1, steps=steps, step_flushes=every, step_steady=steady, step_locks=locks, sr=series)
    variant = Variant.model_validate(built)  # as results.json will hold it
    ledger = variant.ledger
    assert ledger.sent == 15_000 and ledger.steps_offered_per_s == [500, 1_000]
    lock = variant.probes.lock
    assert lock is not None and lock.wait_ms is not None and lock.wait_ms.count == ledger.sent
    size = variant.probes.flush["parquet"].size
    assert size is not None and size.count == len(steady[0]) + len(steady[1])
    assert size.total_ms.max is not None and size.total_ms.max < 160, "no flush of the overloaded step"
    append = variant.probes.append_cost
    assert append is not None and append.count == len(every[1]), "the longest of the judged steps"
    assert variant.latency_ms == Latency.model_validate(steps[1]["latency_ms"])


def test_a_small_sweeps_report_says_what_its_variant_covers(small_run: SmallRun) -> None:
    (variant,) = small_run.results.variants
    assert small_run.results.capacity is not None
    steps = small_run.results.capacity.series[0].steps
    lock = variant.probes.lock
    assert lock is not None and lock.wait_ms is not None
    assert lock.wait_ms.count == variant.ledger.sent == sum(s.sent or 0 for s in steps)
    assert all(s.sent is not None and s.flush_ms is not None for s in steps)
    flushes = sum(d.count for d in parquet_flush_triggers(variant) if d is not None)
    assert flushes == sum(s.flush_ms.count for s in steps if s.flush_ms), "the step table's flushes, after settle"
    markdown = (small_run.run_dir / "summary.md").read_text(encoding="utf-8")
    rates = ", ".join(f"{s.offered_per_s:,.0f}" for s in steps)
    assert f"ledger, flush and lock figures cover its {len(steps)} sustainable step(s) ({rates} msg/s)" in markdown
    verdict = next(line for line in markdown.splitlines() if line.startswith("**"))
    assert verdict.startswith("**PASSED**") and f"sustainable {steps[-1].offered_per_s:,.0f} msg/s" in verdict


def test_cpu_and_memory_readings_follow_real_work() -> None:
    me = os.getpid()
    before, machine_before = process_cpu_s(me), machine_busy_s()
    assert before is not None and machine_before is not None
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # 0.3 s of this process's own CPU
        pass
    after, machine_after = process_cpu_s(me), machine_busy_s()
    assert after is not None and machine_after is not None
    assert after - before >= 0.25  # clock ticks: 10 ms resolution
    busy_delta, total_delta = (a - b for a, b in zip(machine_after, machine_before, strict=True))
    assert 0.25 <= busy_delta <= total_delta
    rss = rss_bytes()
    block = bytearray(64 * 1024 * 1024)  # touched: bytearray zero-fills
    assert rss_bytes() - rss >= 48 * 1024 * 1024
    del block
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    assert process_cpu_s(int(dead.stdout)) is None
