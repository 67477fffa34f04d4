"""bench calibrate: real child processes against a bench-managed Mosquitto (or the embedded broker without one).

No wall-clock bounds: the figures are CPU times of the measured processes and counts; the one rate check is a
hard bound that follows from CPU time burnt on the sending thread, not from the machine's speed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.calibrate.model import CALIBRATION_NAME, Calibration, Spread, load_calibration
from bench.calibrate.runner import PAIRS, ROWS, CalibrateOptions, run_calibrate
from bench.cli import main

MESSAGES = 2_000


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """One full calibration through the CLI, as a user runs it (2,000 messages, 2 repetitions)."""
    out = tmp_path_factory.mktemp("cal") / "run"
    code = main(["calibrate", "--messages", str(MESSAGES), "--repeats", "2", "--out", str(out)])
    return code, out


def test_a_calibration_writes_every_row_with_both_sides_and_their_spread(quick: tuple[int, Path]) -> None:
    code, out = quick
    assert code == 0
    cal = load_calibration(out)
    assert [r.key for r in cal.rows] == [key for key, *_ in ROWS]
    assert cal.messages == MESSAGES and cal.repeats == 2
    for row in cal.rows:
        for side in (row.bench, row.bare):
            assert len(side.values) == 2, row.key
            assert 0 < side.min <= side.median <= side.max, row.key
        assert row.ratio > 0 and row.ratio == pytest.approx(row.bench.median / row.bare.median, rel=1e-2)
    # The machine it was measured on, and the ceiling bench capacity reads: the bench publisher's median rate.
    assert cal.machine.cores == os.cpu_count() and cal.machine.paho
    assert cal.broker in ("mosquitto", "embedded")
    for qos in (0, 1):
        rate = cal.row(f"publisher_rate_qos{qos}")
        assert rate is not None and cal.ceiling(qos) == rate.bench.median > 0
    assert cal.ceiling(2) == cal.ceiling(1)
    # ~100-byte payloads of the capacity scenario's stream.
    assert 50 < cal.payload_bytes_mean < 200


def test_each_measurement_ran_in_a_child_process_of_its_own(quick: tuple[int, Path]) -> None:
    _, out = quick
    configs = sorted(p for p in (out / "children").glob("[0-9][0-9][0-9]-*.json") if ".final" not in p.suffixes)
    kinds = [json.loads(p.read_text()).get("kind", "pipeline_worker") for p in configs]
    # A B A B: per repetition and pair the bench side, then the bare side (each pipeline pair has a feed too).
    measured = [k for k, p in zip(kinds, configs, strict=True) if "feed_publisher" not in p.name]
    per_repeat = ["bench_publisher", "bare_publisher"] * 2 + ["pipeline_worker", "bare_subscriber"]
    per_repeat += ["chain_bench", "chain_bare"]
    assert measured == per_repeat * 2
    # The pipeline worker wrote its rows: the pipeline side really persisted what it was fed.
    finals = [json.loads(p.read_text()) for p in (out / "children").glob("*-pipeline/final.json")]
    assert len(finals) == 2 and all(f["accepted"] == MESSAGES and not f["errors"] for f in finals)


def test_the_table_and_the_file_agree(quick: tuple[int, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, out = quick
    cal = Calibration.model_validate_json((out / CALIBRATION_NAME).read_text())
    from rich.console import Console

    from bench.cli import calibration_table

    console = Console(width=200, record=True)
    console.print(calibration_table(cal))
    text = console.export_text()
    for row in cal.rows:
        assert row.label in text and f"{row.ratio:.2f}x" in text


def test_a_slower_publisher_and_chain_show_up_in_their_cpu_rows(tmp_path: Path) -> None:
    """The bench side burns 300 us of CPU per message (a test-only hook in its child process). Its CPU per 1k
    then has to be at least 300 ms (the burn is CPU time of that very process, inside the measured window) and
    its rate at most 1 / 300 us (the burn runs on the sending thread, between sends): bounds, not speeds."""
    burn_us = 300.0
    outcome = run_calibrate(
        CalibrateOptions(
            messages=MESSAGES, repeats=1, out=tmp_path / "run", burn_us=burn_us, only=("publisher", "chain")
        )
    )
    cal = outcome.calibration
    assert {r.key for r in cal.rows} == {
        "publisher_cpu_qos0",
        "publisher_rate_qos0",
        "publisher_cpu_qos1",
        "publisher_rate_qos1",
        "chain_us_per_msg",
    }
    for qos in (0, 1):
        cpu = cal.row(f"publisher_cpu_qos{qos}")
        rate = cal.row(f"publisher_rate_qos{qos}")
        assert cpu is not None and rate is not None
        assert cpu.bench.median >= burn_us  # ms per 1k = us per message
        assert cpu.bench.median > cpu.bare.median and cpu.ratio > 1
        assert rate.bench.median <= 1e6 / burn_us
    chain = cal.row("chain_us_per_msg")
    assert chain is not None and chain.bench.median >= burn_us > chain.bare.median


def test_spread_is_median_min_max_in_run_order() -> None:
    s = Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.min, s.max, s.values) == (2.5, 1.0, 10.0, [3.0, 1.0, 2.0, 10.0])
    assert Spread.of([5.0, 1.0, 2.0]).median == 2.0


def test_every_pair_is_measured_by_default() -> None:
    assert set(PAIRS) == {key for _, key, *_ in ROWS}


def test_a_broken_calibration_file_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "calibration.json"
    bad.write_text(json.dumps({"kind": "calibration", "created_at": "x"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"calibration\.json: broker: Field required"):
        load_calibration(tmp_path)
    code = main(["capacity", "scenarios/capacity.yaml", "--calibration", str(bad), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("bench: error: --calibration: ") and "Traceback" not in err
    assert not (tmp_path / "r").exists()
    code = main(["capacity", "scenarios/capacity.yaml", "--calibration", str(tmp_path / "nope.json")])
    assert code == 2 and "cannot read" in capsys.readouterr().err
