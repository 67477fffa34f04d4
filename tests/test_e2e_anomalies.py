"""End to end with the anomaly catalogue: every class injected, scored against the truth, read back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import sqlalchemy as sa

from bench.cli import main
from bench.harness import runner
from bench.results.model import Validation, ValidationClass
from bench.scenario import load_scenario
from simulators.anomalies import KINDS, OPCUA_KINDS

FLEET_EXTRA = ["O'Hara\"; DELETE FROM readings; --", "..\\\\plant/..\\\\etc", "Presse Müller/Ω 東京 #1"]


def every_kind(rate: float) -> str:
    lines = [f"  - {{kind: {kind!r}, rate: {rate}}}" for kind in KINDS if not kind.startswith("dst_")]
    # DST kinds only on machines whose zone has DST (m-0 and m-2 are in Europe/Paris).
    lines += [
        f"  - {{kind: {kind}, rate: {rate * 2}, machines: [m-0, m-2]}}" for kind in KINDS if kind.startswith("dst_")
    ]
    return "anomalies:\n" + "\n".join(lines) + "\n"


SCENARIO = (
    """
name: dirt
seed: 11
machines:
  count: 4
  id: "m-{i}"
  extra: EXTRA
  timezone: [Europe/Paris, Asia/Kolkata]
phases:
  - {kind: steady, rate: 2000, duration: 2s}
transport: {kind: memory}
pipeline:
  buffer: {size: 500, flush_interval: 200ms}
  parquet: {fsync: false}
  sql: {strategy: bulk, aggregate: raw}
"""
    # YAML single quotes: a quote inside is written twice.
    .replace("EXTRA", "[" + ", ".join("'" + m.replace("'", "''") + "'" for m in FLEET_EXTRA) + "]")
    + every_kind(0.02)
)


def scored(outcome: runner.RunOutcome, variant: int = 0) -> Validation:
    validation = outcome.results.variants[variant].validation
    assert validation is not None
    return validation


def classes(outcome: runner.RunOutcome, variant: int = 0) -> dict[str, ValidationClass]:
    return scored(outcome, variant).classes


def test_every_class_is_scored_and_matches_its_policy(write_scenario: Callable[[str], Path], tmp_path: Path) -> None:
    outcome = runner.run(
        load_scenario(write_scenario(SCENARIO)), runner.RunOptions(out=tmp_path / "r", calibrate=False)
    )
    assert outcome.ok, outcome.problems()
    validation = scored(outcome)
    assert validation.mismatches == 0, validation.mismatch_sample
    table = classes(outcome)
    assert set(KINDS) | {"valid"} <= set(table), set(KINDS) - set(table)
    # A few decisions spelled out, so a wrong oracle and a wrong validator cannot agree silently.
    assert table["nan"].decisions == {"rejected:non_finite": table["nan"].injected}
    assert table["offset_timestamp"].decisions == {"repaired:utc_normalised": table["offset_timestamp"].injected}
    assert table["out_of_order"].decisions == {"accepted": table["out_of_order"].injected}
    assert table["duplicate"].decisions == {"rejected:duplicate": table["duplicate"].injected}
    ledger = outcome.ledger
    assert ledger.reconciled and ledger.quarantine_rows == ledger.rejected
    checks = validation.output_checks
    assert checks is not None and checks.non_finite_values == checks.files_with_naive_timestamps == 0
    # Hostile but real ids: stored exactly in Parquet and SQL, and never a path.
    data = ds.dataset(tmp_path / "r" / "data", format="parquet").to_table(columns=["machine"])
    stored = set(data.column("machine").to_pylist())
    assert set(FLEET_EXTRA) <= stored
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'r' / 'loading_rate.db'}")
    with engine.connect() as conn:
        sql_ids = {row[0] for row in conn.execute(sa.text("SELECT DISTINCT machine FROM readings"))}
    engine.dispose()
    assert sql_ids == stored
    assert not any(".." in p.name for p in (tmp_path / "r").rglob("*"))


def test_a_wrong_expectation_fails_the_run(write_scenario: Callable[[str], Path], tmp_path: Path) -> None:
    """The scenario claims NaN is accepted: the truth disagrees, the run fails and says where."""
    text = SCENARIO.split("anomalies:")[0] + "anomalies:\n  - {kind: nan, rate: 0.05, expect: accepted}\n"
    outcome = runner.run(load_scenario(write_scenario(text)), runner.RunOptions(out=tmp_path / "r", calibrate=False))
    assert outcome.ledger.reconciled
    assert not outcome.ok
    assert any("differ from the truth (nan" in p for p in outcome.problems()), outcome.problems()


def test_a_policy_change_changes_the_expected_decisions(write_scenario: Callable[[str], Path], tmp_path: Path) -> None:
    text = (
        SCENARIO.split("anomalies:")[0].replace(
            "  parquet: {fsync: false}",
            "  parquet: {fsync: false}\n"
            "  validate: {naive_timestamps: assume_machine_zone, rules: {wrong_type: repair}}",
        )
        + "anomalies:\n  - {kind: naive_timestamp, rate: 0.05}\n  - {kind: number_as_string, rate: 0.05}\n"
    )
    outcome = runner.run(load_scenario(write_scenario(text)), runner.RunOptions(out=tmp_path / "r", calibrate=False))
    assert outcome.ok, outcome.problems()
    table = classes(outcome)
    # Every naive local time repaired to the instant its machine meant (the scorer compares each stored ts).
    assert set(table["naive_timestamp"].decisions) <= {
        "repaired:assumed_machine_zone",
        "rejected:ambiguous_local_time",
    }
    assert table["number_as_string"].decisions == {"repaired:number_from_string": table["number_as_string"].injected}


def test_status_codes_travel_over_opcua_and_are_quarantined(
    write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    """Uncertain/Bad StatusCodes and NaN written by the plant server reach the validator's policy."""
    text = """
name: ua-dirt
seed: 3
machines: {count: 5, id: "m-{i}"}
phases:
  - {kind: steady, rate: 200, duration: 1.5s}
transport: {kind: opcua, opcua: {publishing: 50ms}}
pipeline:
  buffer: {size: 100, flush_interval: 200ms}
  parquet: {fsync: false}
anomalies:
  - {kind: status_uncertain, rate: 0.1}
  - {kind: status_bad, rate: 0.1}
  - {kind: nan, rate: 0.05}
  - {kind: out_of_range, rate: 0.05}
"""
    outcome = runner.run(load_scenario(write_scenario(text)), runner.RunOptions(out=tmp_path / "r", calibrate=False))
    assert outcome.ok, outcome.problems()
    table = classes(outcome)
    assert table["status_uncertain"].decisions == {"rejected:status_uncertain": table["status_uncertain"].injected}
    assert table["status_bad"].decisions == {"rejected:status_bad": table["status_bad"].injected}
    assert table["nan"].decisions == {"rejected:non_finite": table["nan"].injected}
    assert min(table[k].injected for k in ("status_uncertain", "status_bad")) >= 10


def test_kinds_that_cannot_travel_over_opcua_are_refused(
    write_scenario: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    text = SCENARIO.replace("transport: {kind: memory}", "transport: {kind: opcua}")
    path = write_scenario(text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    first = next(i for i, kind in enumerate(k for k in KINDS if not k.startswith("dst_")) if kind not in OPCUA_KINDS)
    assert f"{path}: anomalies[{first}].kind: null cannot travel over OPC UA" in err, err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def duplicate_key_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[runner.RunOutcome, Path]:
    """One run, two variants: the rule at its default (reject) and at accept."""
    folder = tmp_path_factory.mktemp("duplicate_key")
    text = (
        SCENARIO.split("anomalies:")[0]
        + "anomalies:\n  - {kind: duplicate_key, rate: 0.05}\n"
        + "matrix:\n  - {name: reject}\n  - {name: accept, pipeline.validate.rules.duplicate_key: accept}\n"
    )
    path = folder / "scenario.yaml"
    path.write_text(text, encoding="utf-8")
    out = folder / "r"
    return runner.run(load_scenario(path), runner.RunOptions(out=out, calibrate=False)), out


def test_duplicate_keys_are_quarantined_and_scored(duplicate_key_run: tuple[runner.RunOutcome, Path]) -> None:
    """machine, seq or load_rate named twice in one payload: quarantined as duplicate_key by default and
    scored; with the rule at accept, stored with the last (true) values."""
    outcome, out = duplicate_key_run
    assert outcome.ok, outcome.problems()
    refused, kept = classes(outcome, 0)["duplicate_key"], classes(outcome, 1)["duplicate_key"]
    assert refused.injected == kept.injected >= 150
    assert refused.expected == {"rejected:duplicate_key": refused.injected}
    assert refused.mismatches == kept.mismatches == 0
    # Every send is in the quarantine under its reason (the ledger reads it back: nothing lost).
    assert outcome.results.variants[0].ledger.lost == 0
    assert refused.decisions.get("rejected:duplicate_key", 0) + refused.decisions.get("lost", 0) == refused.injected
    assert kept.decisions == {"accepted": kept.injected}
    quarantine = ds.dataset(out / "reject" / "quarantine", format="parquet").to_table().to_pylist()
    rows = [r for r in quarantine if r["reason"] == "duplicate_key"]
    assert len(rows) == refused.injected
    # A repeated seq is not trusted: that row names no seq (the bench matches it by payload); the others do.
    unnamed = [r for r in rows if r["seq"] is None]
    assert 0 < len(unnamed) < len(rows)
    assert all(r["payload"].count(b'"seq":') == 2 for r in unnamed)


@pytest.mark.xfail(
    "duplicate_key" not in runner.UNREADABLE,
    reason="bench/harness/runner.py matches quarantine rows without a seq to their send by payload only for the "
    "kinds in "
    "UNREADABLE; duplicate_key (a repeated seq) must be added there",
    strict=True,
)
def test_every_duplicate_key_row_is_paired_with_its_send(duplicate_key_run: tuple[runner.RunOutcome, Path]) -> None:
    outcome, _ = duplicate_key_run
    refused = classes(outcome, 0)["duplicate_key"]
    assert refused.decisions == {"rejected:duplicate_key": refused.injected}


def test_duplicate_key_cannot_travel_over_opcua(
    write_scenario: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # OPC UA carries values, not JSON text: the source builds each payload from a dict, which cannot repeat a name.
    assert "duplicate_key" not in OPCUA_KINDS
    text = SCENARIO.split("anomalies:")[0].replace("transport: {kind: memory}", "transport: {kind: opcua}")
    path = write_scenario(text + "anomalies:\n  - {kind: duplicate_key, rate: 0.1}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: anomalies[0].kind: duplicate_key cannot travel over OPC UA" in err, err
