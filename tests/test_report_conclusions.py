"""bench report, issue 14 (reports): the conclusion first, only sections that apply, validation in the files,
no ratios across scenarios, comparisons in a new folder, counts that agree or say what they count, the tail
where a p99 misleads, slopes with their interval. Each test replays a user's reproduction on real runs."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bench.cli import main
from bench.errors import UsageError
from bench.gate import runner as gate
from bench.harness import runner
from bench.harness.probes import append_cost
from bench.report.render import ReportPaths, default_out_dir, verdict, write_report
from bench.results.metrics import TAIL_SHARE_WARNING, tail_share_bound
from bench.results.model import read_results
from bench.scenario import load_scenario
from pipeline.model import FlushStat
from pipeline.probes import Recorder
from tests.conftest import SCENARIOS

# ----------------------------------------------------------------------------- real runs, cut short


def _run(scenario: str, out: Path, messages: int) -> Path:
    outcome = runner.run(
        load_scenario(SCENARIOS / scenario), runner.RunOptions(out=out, messages=messages, calibrate=False)
    )
    assert outcome.ok, outcome.problems()
    return out


LOCK_MESSAGES = 1500


@pytest.fixture(scope="module")
def lock_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """coarse vs swap lock, 8 producers, 50 ms flushes: the issue's lock_contention, 1,500 messages."""
    return _run("lock_contention.yaml", tmp_path_factory.mktemp("runs") / "lock", LOCK_MESSAGES)


@pytest.fixture(scope="module")
def burst_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run("burst.yaml", tmp_path_factory.mktemp("runs") / "burst", 600)


@pytest.fixture(scope="module")
def anomaly_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every anomaly class, scored against the truth: the table a user saw only in the terminal."""
    return _run("anomalies.yaml", tmp_path_factory.mktemp("runs") / "anomalies", 1500)


def results_of(run: Path) -> dict[str, Any]:
    results: dict[str, Any] = json.loads((run / "results.json").read_text(encoding="utf-8"))
    return results


def variant_of(run: Path, tmp_path: Path, change: Callable[[dict[str, Any]], None], name: str = "run") -> Path:
    """A copy of a real run's results, changed as a user's run would have come out."""
    results = copy.deepcopy(results_of(run))
    change(results)
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return folder


def read(paths: ReportPaths) -> tuple[str, str]:
    return paths.html.read_text(encoding="utf-8"), paths.markdown.read_text(encoding="utf-8")


def verdict_html(html: str) -> list[str]:
    return re.findall(r'<p class="verdict [^"]*"[^>]*>(.*?)</p>', html, re.S)


def md_verdicts(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if re.match(r"\*\*(PASSED|FAILED|INCONCLUSIVE)\*\*", line)]


def md_row(markdown: str, label: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def section(html: str, section_id: str) -> str:
    found = re.search(rf'<section id="{re.escape(section_id)}"[^>]*>(.*?)</section>', html, re.S)
    assert found, section_id
    return found.group(1)


# ----------------------------------------------------------------------------- the conclusion first


def test_the_verdict_comes_before_everything_else(lock_run: Path, tmp_path: Path) -> None:
    html, markdown = read(write_report([lock_run], tmp_path))
    variants = results_of(lock_run)["variants"]
    first = html.index('<p class="verdict')
    assert html.index("</h1>") < first < html.index('class="lede"') < html.index("<section")
    (line,) = verdict_html(html)
    assert "<strong>PASSED</strong>" in line and "ledger reconciled" in line
    assert f"{variants[0]['ledger']['sent']:,} sent" in line
    body = [line for line in markdown.splitlines() if line.strip()]
    assert body[0].startswith("## ") and body[1] == md_verdicts(markdown)[0]
    assert body[1].startswith("**PASSED**") and f"{variants[0]['ledger']['sent']:,} sent" in body[1]


def _lose(results: dict[str, Any]) -> None:
    ledger = results["variants"][1]["ledger"]
    ledger.update(lost=7, persisted=ledger["persisted"] - 7, reconciled=False)


def _error(results: dict[str, Any]) -> None:
    results["variants"][0]["pipeline"]["errors"] = ["parquet sink: disk full"]


def _fault(kind: str, at_s: float, **cost: Any) -> dict[str, Any]:
    """A fault event as schema 10 writes it; ``cost`` overrides its counts."""
    event = {"kind": kind, "at_s": at_s, "recovered_s": 1.5, "error": None, "duration_s": 1.4}
    return {**event, "expected_loss": False, "named": 0, "lost": 0, "duplicated": 0, **cost}


def _lost_in_a_fault(results: dict[str, Any]) -> None:
    """swap, crash-safe, lost 7 messages intended while it was down: the loss is placed in its fault, in words."""
    _lose(results)
    results["variants"][1]["fault_events"] = [_fault("process_kill", 3.3, lost=7), _fault("process_kill", 9.1)]


def _lost_in_many_faults(results: dict[str, Any]) -> None:
    _lose(results)
    results["variants"][1]["fault_events"] = [_fault("broker_partition", 2.0 + i, lost=1 + i) for i in range(5)]
    results["variants"][1]["ledger"].update(lost=15)


def _named_in_a_fault(results: dict[str, Any]) -> None:
    """coarse at QoS 0 through a partition: 120 losses named by it, the run passes and says so."""
    ledger = results["variants"][0]["ledger"]
    ledger.update(persisted=ledger["persisted"] - 120, dropped=120, dropped_by_reason={"broker_partition": 120})
    partition = _fault("broker_partition", 5.0, expected_loss=True, named=120, detail="mode drop")
    results["variants"][0]["fault_events"] = [partition]


def _not_back(results: dict[str, Any]) -> None:
    results["variants"][0]["fault_events"] = [_fault("disk_full", 4.0, recovered_s=None, error="not back within 60 s")]


def _failed_variant(results: dict[str, Any]) -> None:
    results["failures"] = [{"variant": "sql", "error": "ServiceError: the sql sink could not start"}]


def _sweep(sustainable: float | None) -> Callable[[dict[str, Any]], None]:
    def change(results: dict[str, Any]) -> None:
        steps = [
            {"offered_per_s": 1500.0, "sustainable": sustainable is not None, "lost": 0, "errors": []},
            {"offered_per_s": 2000.0, "sustainable": False, "lost": 4, "errors": []},
        ]
        results["capacity"] = {
            "series": [
                {
                    "workers": 1,
                    "steps": steps,
                    "sustainable_per_s": sustainable,
                    "knee": {"offered_per_s": 2000.0, "p99_ms": 812.4, "method": "p99 above 2x"},
                }
            ]
        }

    return change


@pytest.mark.parametrize(
    ("change", "status", "expected"),
    [
        (_lose, "FAILED", ["ledger NOT reconciled", f"swap: 7 lost of {LOCK_MESSAGES:,} sent"]),
        (_error, "FAILED", ["coarse: pipeline error: parquet sink: disk full"]),
        (_sweep(1500.0), "PASSED", ["1 worker: sustainable 1,500 msg/s, knee at 2,000 msg/s (p99 812 ms)"]),
        (_sweep(None), "FAILED", ["1 worker: no sustainable step, knee at 2,000 msg/s (p99 812 ms)"]),
        (
            _lost_in_a_fault,
            "FAILED",
            [
                f"swap: 7 lost of {LOCK_MESSAGES:,} sent",
                "swap: 7 message(s) lost unexplained during faults: 7 in process_kill at 3.3 s (faults the "
                "configuration promised to survive)",
            ],
        ),
        (
            _lost_in_many_faults,
            "FAILED",
            [
                "swap: 15 message(s) lost unexplained during faults: 1 in broker_partition at 2.0 s, 2 in "
                "broker_partition at 3.0 s, 3 in broker_partition at 4.0 s and 9 in 2 more fault(s)",
            ],
        ),
        (
            _named_in_a_fault,
            "PASSED",
            [
                "ledger reconciled",
                "coarse: 120 loss(es) named by 1 fault(s) the configuration was not expected to survive "
                "(broker_partition 120)",
            ],
        ),
        (_not_back, "FAILED", ["coarse: disk_full at 4.0 s: not back: not back within 60 s"]),
        (_failed_variant, "FAILED", ["sql: did not run: ServiceError: the sql sink could not start"]),
    ],
    ids=[
        "lost",
        "pipeline-error",
        "capacity",
        "no-sustainable-step",
        "lost-in-a-fault",
        "lost-in-many-faults",
        "named-in-a-fault",
        "fault-not-back",
        "variant-did-not-run",
    ],
)
def test_the_verdict_is_derived_from_the_results(
    lock_run: Path, tmp_path: Path, change: Callable[[dict[str, Any]], None], status: str, expected: list[str]
) -> None:
    html, markdown = read(write_report([variant_of(lock_run, tmp_path, change)], tmp_path / "out"))
    (line,) = verdict_html(html)
    (md_line,) = md_verdicts(markdown)
    assert f"<strong>{status}</strong>" in line and md_line.startswith(f"**{status}**")
    for words in expected:
        assert words in line and words in md_line, (words, line)


@pytest.mark.parametrize(
    ("gate_result", "status", "words"),
    [
        (
            {"outcome": "failed", "failed": True, "reasons": ["sink_cpu_us_per_row: +9.8% beyond 5%"]},
            "FAILED",
            "gate FAILED",
        ),
        (
            {"outcome": "inconclusive", "failed": False, "reasons": [], "inconclusive": ["3 pairs: too few"]},
            "INCONCLUSIVE",
            "gate INCONCLUSIVE",
        ),
        ({"outcome": "passed", "failed": False, "reasons": []}, "PASSED", "gate passed"),
    ],
    ids=["failed", "inconclusive", "passed"],
)
def test_a_gate_replicate_carries_the_gates_verdict(
    lock_run: Path, tmp_path: Path, gate_result: dict[str, Any], status: str, words: str
) -> None:
    """A gate's replicates sit in its folder beside gate.json: their report says what the gate concluded."""
    replicate = variant_of(lock_run, tmp_path / "lock-gate", lambda r: None, name="B01")
    (replicate.parent / "gate.json").write_text(json.dumps(gate_result), encoding="utf-8")
    html, markdown = read(write_report([replicate], tmp_path / "out"))
    (line,) = verdict_html(html)
    assert f"<strong>{status}</strong>" in line and words in line
    for reason in [*gate_result["reasons"], *gate_result.get("inconclusive", [])]:
        assert reason in line and reason in md_verdicts(markdown)[0]


def test_a_gate_folder_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "gate.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UsageError, match="a gate folder") as info:
        write_report([tmp_path])
    assert "replicate folders (A01, B01, ...)" in str(info.value) and info.value.exit_code == 2


def test_the_verdict_is_there_for_a_command_to_print_first(lock_run: Path) -> None:
    line = verdict(results_of(lock_run), lock_run)
    assert line.status == "PASSED" and line.label == ""
    assert line.parts[0].startswith(f"ledger reconciled: {LOCK_MESSAGES:,} sent")


def test_the_gates_own_summary_starts_with_its_verdict() -> None:
    result = {
        "scenario": {"name": "gate"},
        "design": "paired",
        "baseline": {"kind": "self"},
        "replicates": {"A": [{}], "B": [{}]},
        "multiple_comparisons": "Holm",
        "metrics": [],
        "counters": [],
        "bounds": [],
        "outcome": "failed",
        "failed": True,
        "reasons": ["sink_cpu_us_per_row: +9.8%", "lost: 3 messages"],
    }
    lines = [line for line in gate.markdown(result).splitlines() if line]
    assert lines[1] == "**FAILED**: sink_cpu_us_per_row: +9.8% (and 1 more below)"


# ----------------------------------------------------------------------------- only sections that apply


def test_a_plain_run_has_no_placeholders_for_capacity_or_validation(lock_run: Path, tmp_path: Path) -> None:
    html, markdown = read(write_report([lock_run], tmp_path))
    assert "Not plotted" not in html and 'class="missing"' not in html
    for absent in ("plot-capacity", "plot-usl", "table-capacity", "table-recommendations", "table-validation"):
        assert f'id="{absent}"' not in html and f'href="#{absent}"' not in html
    assert "capacity sweep" not in markdown and "Left out" not in markdown
    assert 'id="capacity"' not in html, "no empty Capacity group"


def test_a_section_that_applies_but_has_no_data_is_named_once(lock_run: Path, tmp_path: Path) -> None:
    def disable(results: dict[str, Any]) -> None:
        for v in results["variants"]:
            v["probes"]["lock"] = {"strategy": v["probes"]["lock"]["strategy"], "enabled": False}

    html, markdown = read(write_report([variant_of(lock_run, tmp_path, disable)], tmp_path / "out"))
    assert 'id="plot-lock"' not in html
    left_out = section(html, "not-in-this-report")
    assert "Lock wait distribution per strategy" in left_out and "disabled in coarse, swap" in left_out
    assert (
        "- _Lock wait distribution per strategy_: no lock probes in these runs (disabled in coarse, swap)." in markdown
    )


# ----------------------------------------------------------------------------- validation in the files


def test_the_validation_table_is_in_report_html_and_summary_md(anomaly_run: Path, tmp_path: Path) -> None:
    html, markdown = read(write_report([anomaly_run], tmp_path))
    score = results_of(anomaly_run)["variants"][0]["validation"]
    table = section(html, "validation")
    assert "### Validation: truth against decision per anomaly class" in markdown
    assert len(score["classes"]) >= 20
    for truth, row in score["classes"].items():
        assert f'<th scope="row">{truth}</th><td>{row["injected"]:,}</td>' in table, truth
        cells = md_row(markdown, truth)
        assert cells[0] == f"{row['injected']:,}" and cells[-1] == f"{row['mismatches']:,}"
        for decision, n in row["decisions"].items():
            assert f"{decision} {n:,}" in cells[2]
    (line,) = md_verdicts(markdown)
    injected = sum(row["injected"] for row in score["classes"].values())
    assert f"validation: 0 mismatches between truth and decision over {injected:,} messages" in line


def test_a_validation_mismatch_fails_the_verdict_and_is_bold_in_markdown(anomaly_run: Path, tmp_path: Path) -> None:
    def mismatch(results: dict[str, Any]) -> None:
        score = results["variants"][0]["validation"]
        score["classes"]["nan"]["mismatches"] = 2
        score["mismatches"] = 2
        score["mismatch_sample"] = [{"seq": 17, "truth": "nan", "problem": "accepted, expected rejected:non_finite"}]
        score["problems"] = ["2 decision(s) differ from the truth (nan 2); see mismatch_sample"]

    html, markdown = read(write_report([variant_of(anomaly_run, tmp_path, mismatch)], tmp_path / "out"))
    (line,) = md_verdicts(markdown)
    assert line.startswith("**FAILED**") and "2 mismatch(es) between truth and decision (nan 2)" in line
    assert md_row(markdown, "nan")[-1] == "**2**"
    assert "seq 17 nan" in section(html, "validation")


# ----------------------------------------------------------------------------- no ratios across scenarios


def test_no_ratio_between_runs_of_different_scenarios(lock_run: Path, burst_run: Path, tmp_path: Path) -> None:
    _, markdown = read(write_report([lock_run, burst_run], tmp_path))
    assert md_row(markdown, "metric") == ["lock/coarse", "lock/swap", "burst/coarse", "burst/swap"]
    summaries = [v.latency_ms.end_to_end for run in (lock_run, burst_run) for v in read_results(run).variants]
    values = [e2e.p99 for e2e in summaries if e2e is not None and e2e.p99 is not None]
    assert len(values) == 4
    cells = md_row(markdown, "end-to-end p99 ms")
    # Each scenario's first column is its own base; the other scenario's columns are never divided by it.
    assert "(" not in cells[0] and "(" not in cells[2], cells
    for cell, value, base in ((cells[1], values[1], values[0]), (cells[3], values[3], values[2])):
        ratio = value / base
        assert cell.endswith(f"(x{ratio:,.2f})" if ratio >= 0.1 else f"(1/{1 / ratio:,.0f})"), (cell, value, base)
    assert "Columns of different scenarios get no ratio" in markdown


# ----------------------------------------------------------------------------- a comparison in its own folder


def test_bench_report_a_b_leaves_run_as_own_report_alone(
    lock_run: Path, burst_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    own = write_report([lock_run])
    assert own.html == lock_run / "report.html", "one run: its own folder, as before"
    before = own.html.read_bytes(), own.markdown.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(lock_run), str(burst_run)]) == 0
    assert (own.html.read_bytes(), own.markdown.read_bytes()) == before
    (folder,) = (tmp_path / "reports").glob("compare-*")
    assert f"report: {Path('reports') / folder.name / 'report.html'}" in capsys.readouterr().out
    html = (folder / "report.html").read_text(encoding="utf-8")
    assert "lock/coarse" in html and "burst/swap" in html


def test_the_default_comparison_folder_is_never_reused(
    lock_run: Path, burst_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    now = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    runs = [lock_run, burst_run]
    first = write_report(runs, default_out_dir(runs, now))
    second = write_report(runs, default_out_dir(runs, now))
    assert first.html.parent == Path("reports/compare-20261125T120000Z")
    assert second.html.parent == Path("reports/compare-20261125T120000Z-2")
    assert default_out_dir([lock_run], now) == lock_run


# ----------------------------------------------------------------------------- counts that agree or say why


def test_lock_n_is_the_persisted_count_and_the_report_says_so(anomaly_run: Path, tmp_path: Path) -> None:
    """With rejections, the lock plot's n differs from the ledger's sent: puts are accepted messages only."""
    (variant,) = results_of(anomaly_run)["variants"]
    ledger, lock = variant["ledger"], variant["probes"]["lock"]
    assert ledger["rejected"] > 0
    assert lock["wait_ms"]["count"] == ledger["persisted"] + ledger["dropped"] < ledger["sent"]
    assert variant["latency_ms"]["end_to_end"]["count"] == ledger["persisted"]
    html, _ = read(write_report([anomaly_run], tmp_path))
    assert "n counts puts: one per accepted message, so it is the ledger&#39;s persisted" in section(html, "plot-lock")
    assert "n counts persisted messages: the ledger&#39;s persisted, not its sent" in section(html, "plot-latency")


def test_a_capacity_variant_says_which_steps_each_figure_covers(lock_run: Path, tmp_path: Path) -> None:
    def capacity(results: dict[str, Any]) -> None:
        results["kind"] = "capacity"
        variant = results["variants"][0]
        variant["ledger"].update(steps=2, steps_offered_per_s=[500.0, 1000.0])
        variant["throughput"]["offered_per_s"] = 1000.0
        results["variants"] = [variant]

    html, markdown = read(write_report([variant_of(lock_run, tmp_path, capacity)], tmp_path / "out"))
    words = "ledger, flush and lock figures cover its 2 sustainable step(s) (500, 1,000 msg/s)"
    assert words in markdown and words in section(html, "plot-lock")
    assert "highest sustainable step&#39;s (1,000 msg/s)" in section(html, "plot-latency")
    assert "ledger reconciled over 2 sustainable step(s)" in md_verdicts(markdown)[0]


# ----------------------------------------------------------------------------- the tail a p99 hides


def _hold_summary() -> dict[str, Any]:
    """The issue's coarse lock: 40,000 puts of a few microseconds, 160 of them holding it across a 57 ms flush."""
    rec = Recorder()
    for i in range(40_000):
        rec.record_ns(57_000_000 if i % 250 == 0 else 3_000)
    return rec.summary()


def test_a_p99_that_hides_the_tail_is_flagged_and_the_tail_shown(lock_run: Path, tmp_path: Path) -> None:
    hold = _hold_summary()
    assert hold["p99"] < 0.01 and hold["p999"] > 50, "the p99 sits below all 160 long holds"

    def coarse(results: dict[str, Any]) -> None:
        results["variants"][0]["probes"]["lock"]["hold_ms"] = hold

    html, markdown = read(write_report([variant_of(lock_run, tmp_path, coarse)], tmp_path / "out"))
    share = tail_share_bound(hold)
    assert share is not None and share >= TAIL_SHARE_WARNING
    assert (
        md_row(markdown, "lock hold p99 ms")[0]
        == f"{hold['p99']:,.3f} (≥{share:.0%} of the total is in the slowest 1%)"
    )
    assert md_row(markdown, "lock hold p99.9 ms")[0] == f"{hold['p999']:,.3f}"
    assert md_row(markdown, "lock hold max ms")[0] == f"{hold['max']:,.3f}"
    assert md_row(markdown, "lock hold total ms")[0] == f"{hold['total']:,.0f}"
    assert f"at least {share:.0%} of the {hold['total']:,.0f} ms in all lies in the slowest 1%" in markdown
    assert 'class="warn"' in section(html, "strategies")


def test_producer_stall_shows_max_and_total_beside_its_p99(lock_run: Path, tmp_path: Path) -> None:
    _, markdown = read(write_report([lock_run], tmp_path))
    for i, variant in enumerate(results_of(lock_run)["variants"]):
        stall = variant["probes"]["lock"]["stall_ms"]
        assert md_row(markdown, "producer stall max ms")[i].startswith(f"{stall['max']:,.3f}")
        assert md_row(markdown, "producer stall total ms")[i].startswith(f"{stall['total']:,.0f}")
        blocked = variant["pipeline"]["producer_wait_ms"]
        assert md_row(markdown, "blocked on a full buffer ms")[i].startswith(f"{blocked:,.0f}")


# ----------------------------------------------------------------------------- slopes with their interval


def test_the_append_slope_is_printed_with_its_interval(lock_run: Path, tmp_path: Path) -> None:
    _, markdown = read(write_report([lock_run], tmp_path))
    for i, variant in enumerate(results_of(lock_run)["variants"]):
        cost = variant["probes"]["append_cost"]
        cell = md_row(markdown, "append slope")[i]
        assert cell == cost["slope_summary"]
        low, high = cost["slope_ci95_ms_per_mb"]
        assert low <= cost["slope_ms_per_mb"] <= high
        assert ("flat within noise" in cell) == (low <= 0 <= high)


def test_results_without_an_interval_get_one_fitted_from_their_points(lock_run: Path, tmp_path: Path) -> None:
    """Results written before the interval was stored: the report fits it from the stored points."""
    # sql_sinks' "row" variant: four flushes, a cost that wanders by a millisecond either way.
    flushes = [
        FlushStat(
            sink="parquet",
            batch_id=i,
            trigger="size",
            rows=500,
            started_ns=0,
            build_ns=0,
            write_ns=int(ms * 1e6),
            commit_ns=0,
            durable_ns=0,
            bytes_before=int(mb * 1e6),
            rows_before=i * 500,
        )
        for i, (mb, ms) in enumerate([(0.0, 2.0), (0.2, 1.1), (0.4, 2.6), (0.6, 0.9)])
    ]
    cost = append_cost(flushes)
    old = {k: v for k, v in cost.items() if not k.startswith("slope_") or k == "slope_ms_per_mb"}

    def older(results: dict[str, Any]) -> None:
        for v in results["variants"]:
            v["probes"]["append_cost"] = old

    _, markdown = read(write_report([variant_of(lock_run, tmp_path, older)], tmp_path / "out"))
    assert md_row(markdown, "append slope") == [cost["slope_summary"]] * 2
    assert cost["slope_summary"].startswith("flat within noise")
