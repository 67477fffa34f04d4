"""End to end with the strategies: matrix variants, memory transport, drops, SQL, asyncio runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import sqlalchemy as sa

from bench.cli import main
from bench.harness import runner
from bench.results.model import read_results
from bench.scenario import load_scenario

MEMORY = """
name: mem
seed: 4
machines: {count: 6, id: "m-{i}"}
phases:
  - {kind: steady, rate: 3000, duration: 1s}
transport: {kind: memory, memory: {producers: 3}}
pipeline:
  buffer: {size: 200, flush_interval: 200ms}
  parquet: {fsync: false}
"""


def test_matrix_runs_every_variant_on_the_same_stream(write_scenario: Callable[[str], Path], tmp_path: Path) -> None:
    text = MEMORY + (
        "matrix:\n"
        "  - {name: coarse, pipeline.buffer.lock: coarse}\n"
        "  - {name: swap, pipeline.buffer.lock: swap}\n"
        "  - {name: dataset, pipeline.parquet.strategy: dataset, pipeline.runtime: asyncio}\n"
    )
    loaded = load_scenario(write_scenario(text))
    outcome = runner.run(loaded, runner.RunOptions(out=tmp_path / "run", calibrate=False))
    assert outcome.ok, outcome.problems()
    names = [v.name for v in outcome.results.variants]
    assert names == ["coarse", "swap", "dataset"]
    seqs = []
    for name in names:
        table = ds.dataset(tmp_path / "run" / name / "data", format="parquet").to_table(columns=["seq", "load_rate"])
        seqs.append(sorted(zip(table.column("seq").to_pylist(), table.column("load_rate").to_pylist(), strict=True)))
    assert seqs[0] == seqs[1] == seqs[2], "every variant must persist the same stream"
    assert len(seqs[0]) == 3000
    variants = {v.name: v.probes for v in outcome.results.variants}
    coarse_lock = variants["coarse"].lock
    assert coarse_lock is not None and coarse_lock.strategy == "coarse"
    loop_lag = variants["dataset"].loop_lag_ms
    assert loop_lag is not None and loop_lag.count > 0
    assert variants["swap"].loop_lag_ms is None  # threads runtime has no loop
    assert coarse_lock.wait_ms is not None and coarse_lock.wait_ms.count == 3000


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_overflow_drops_are_counted_in_the_ledger(
    policy: str, write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    """A tiny buffer behind a slow sink must drop; every drop is in the ledger by reason."""
    text = (
        MEMORY.replace(
            "  buffer: {size: 200, flush_interval: 200ms}",
            f"  buffer: {{size: 50, capacity: 100, flush_interval: 100ms, overflow: {policy}}}",
        )
        + "faults:\n  - {kind: slow_sink, delay: 100ms}\n"
    )
    outcome = runner.run(load_scenario(write_scenario(text)), runner.RunOptions(out=tmp_path / "r", calibrate=False))
    ledger = outcome.ledger
    assert ledger.reconciled, ledger.problems()
    # 3,000 offered in 1 s against at most ~100 rows per 100 ms flush: drops are certain.
    assert ledger.dropped > 0
    assert ledger.sent == ledger.persisted + ledger.dropped
    assert ledger.dropped_by_reason == {f"overflow_{policy}": ledger.dropped}
    stats = outcome.results.variants[0].pipeline
    assert stats is not None and stats.dropped_by_reason == {f"overflow_{policy}": ledger.dropped}


def test_sql_sink_end_to_end_on_sqlite(write_scenario: Callable[[str], Path], tmp_path: Path) -> None:
    text = MEMORY + (
        "  sql: {url: 'sqlite:///agg.db', strategy: upsert, aggregate: per_machine_minute}\n"
        "run: {start: '2026-01-01T00:00:30Z'}\n"
    )
    outcome = runner.run(load_scenario(write_scenario(text)), runner.RunOptions(out=tmp_path / "r", calibrate=False))
    assert outcome.ok, outcome.problems()
    sql = outcome.results.variants[0].sql
    assert sql is not None and sql.check == "ok"
    assert sql.sum_count == 3000
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'r' / 'agg.db'}")
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT machine, ts, count FROM loading_rate ORDER BY ts, machine")).all()
    # 1 s of data from 00:00:30: one minute, six machines, 500 readings each.
    assert [(r[0], r[2]) for r in rows] == [(f"m-{i}", 500) for i in range(6)]
    assert {str(r[1]) for r in rows} == {"2026-01-01 00:00:00.000000"}


def test_sql_url_override_and_fixed_start_make_upsert_idempotent(
    write_scenario: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs of the same stream into one table with upsert leave each key once."""
    db = tmp_path / "shared.db"
    text = MEMORY + (
        "  sql: {url: 'sqlite:///unused.db', strategy: upsert, aggregate: raw}\nrun: {start: '2026-01-01T00:00:00Z'}\n"
    )
    path = write_scenario(text)
    for attempt in range(2):
        code = main(
            ["run", str(path), "--out", str(tmp_path / f"r{attempt}"), "--quiet", "--sql-url", f"sqlite:///{db}"]
        )
        assert code == 0, capsys.readouterr().err
    sql = read_results(tmp_path / "r1").variants[0].sql
    assert sql is not None and sql.rows == 3000, "the second run must update, not duplicate"
    assert sql.created_by_run is False and sql.check is not None and sql.check.startswith("skipped")


def test_sql_url_with_password_is_refused(
    tmp_path: Path, write_scenario: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_scenario(MEMORY + "  sql: {url: 'sqlite:///x.db'}\n")
    code = main(["run", str(path), "--out", str(tmp_path / "r"), "--sql-url", "postgresql://u:secret@h/db"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--sql-url" in err and "no password" in err and "secret" not in err


def test_matrix_errors_name_the_variant(write_scenario: Callable[[str], Path]) -> None:
    from bench.errors import ScenarioError

    path = write_scenario(MEMORY + "matrix:\n  - {name: bad, pipeline.buffer.lock: medium}\n")
    with pytest.raises(
        ScenarioError, match=r"matrix\[0\] \(bad\): pipeline.buffer.lock: Input should be 'coarse' or 'swap'"
    ):
        load_scenario(path)
    path = write_scenario(MEMORY + "matrix:\n  - {name: s, seed: 3}\n")
    with pytest.raises(ScenarioError, match=r"matrix\[0\].seed: only pipeline"):
        load_scenario(path)
    path = write_scenario(MEMORY + "matrix:\n  - {name: a}\n  - {name: a}\n")
    with pytest.raises(ScenarioError, match="unique"):
        load_scenario(path)
