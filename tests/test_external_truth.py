"""An external system judged by the truth labels of what was sent: bad input it leaves out is 'not persisted, as
its truth label allows', not lost; a good message found nowhere is lost and fails the run; bad input it stores
and good input it refuses are findings, shown, never failures.

The runs use a tiny pipeline (tests/data/ext_truth_pipeline.py) over the embedded broker; the pairing rules are
tested on their own below, without a run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.errors import ScenarioError
from bench.harness import runner
from bench.harness.scoring import EXPECTED_NOT_PERSISTED, expected_not_persisted, tally_external
from bench.report.render import verdict
from bench.results.metrics import METRIC_ROWS
from bench.scenario import load_scenario

PIPELINE = Path(__file__).parent / "data" / "ext_truth_pipeline.py"
EVERY = 37  # the pipeline's modulus for --drop-valid and --refuse-valid

SCENARIO = """
name: truth
seed: 7
machines: {count: 4}
transport: {kind: mqtt, mqtt: {qos: 1}}
system:
  kind: external
  external:
    command: ["{python}", PIPELINE, "{broker_url}", "{topic}", "{out_dir}/out.jsonl" EXTRA]
    ready: {log: "subscribed", timeout: 20s}
    output: {format: jsonl, path: "{out_dir}/out.jsonl"}
REJECTS
phases:
  - {kind: steady, rate: 200, duration: 2s}
anomalies:
  - {kind: nan, rate: 0.03, field: load_rate}
  - {kind: missing_field, rate: 0.03, field: load_rate}
  - {kind: malformed_json, rate: 0.02}
  - {kind: future_timestamp, rate: 0.03}
  - {kind: offset_timestamp, rate: 0.02}
run: {drain_timeout: 2s}
"""
KEPT = '    rejects: {format: jsonl, path: "{out_dir}/rejected.jsonl", reason: reason}'


def _run(
    write_scenario: Callable[[str], Path], tmp_path: Path, *, extra: str = "", rejects: bool = False
) -> runner.RunOutcome:
    if rejects:
        extra += ', --rejects, "{out_dir}/rejected.jsonl"'
    text = (
        SCENARIO.replace("PIPELINE", str(PIPELINE)).replace(" EXTRA", extra).replace("REJECTS", KEPT if rejects else "")
    )
    path = write_scenario(text)
    return runner.run(load_scenario(path), runner.RunOptions(out=tmp_path / "run", calibrate=False))


def _summary(outcome: runner.RunOutcome) -> dict[str, str]:
    """The CLI summary's rows for the first variant, as printed (label -> text)."""
    v = outcome.results.variants[0]
    return {row.label.strip(): row.fmt.format(value) for row in METRIC_ROWS if (value := row.value(v)) is not None}


def test_bad_input_dropped_silently_is_not_lost_and_bad_input_stored_is_a_finding(
    tmp_path: Path, write_scenario: Callable[[str], Path]
) -> None:
    outcome = _run(write_scenario, tmp_path)
    assert outcome.ok, outcome.problems()
    v = outcome.results.variants[0]
    lg, truth = v.ledger, v.truth
    assert truth is not None and not truth.rejects_kept
    classes = truth.classes
    assert {"valid", "nan", "missing_field", "malformed_json", "future_timestamp", "offset_timestamp"} <= set(classes)
    # What it refuses leaves no trace: every such message is set aside, by its label, and none is lost.
    refused = ("nan", "missing_field", "malformed_json")
    for label in refused:
        c = classes[label]
        assert c.expected == "not_persisted" and c.sent > 0
        assert c.not_persisted == c.sent and c.persisted == c.lost == 0, label
    assert lg.lost == 0 and lg.rejected == 0
    assert lg.not_persisted_expected == sum(classes[label].sent for label in refused)
    assert lg.not_persisted_by_truth == {label: classes[label].sent for label in refused}
    assert lg.sent == lg.persisted + lg.not_persisted_expected
    # It never compares ts with the clock: every future reading stored, which is a finding, not a failure.
    future = classes["future_timestamp"]
    assert future.persisted == future.sent > 0
    assert truth.accepted_bad_input == {"future_timestamp": future.sent}
    assert truth.findings == [f"{future.sent:,} persisted despite truth label: future_timestamp {future.sent:,}"]
    # A reading in another zone is a good one, stored; so is every clean one.
    assert classes["offset_timestamp"].expected == "persisted"
    assert classes["offset_timestamp"].persisted == classes["offset_timestamp"].sent
    assert classes["valid"].persisted == classes["valid"].sent
    # Shown where a reader looks: the summary's rows and the verdict line, which still passes.
    rows = _summary(outcome)
    assert rows["not persisted (truth: bad input)"].startswith(f"{lg.not_persisted_expected:,} (")
    assert rows["persisted despite truth label"] == f"{future.sent:,} (future_timestamp {future.sent:,})"
    assert "refused good input" not in rows, "unknown without rejects, so not shown as 0"
    line = verdict(outcome.results, outcome.run_dir)
    assert line.status == "PASSED"
    assert any("persisted despite truth label" in part for part in line.parts)


def test_good_input_dropped_silently_is_lost_and_fails_the_run(
    tmp_path: Path, write_scenario: Callable[[str], Path]
) -> None:
    outcome = _run(write_scenario, tmp_path, extra=", --drop-valid, '5'")
    dropped = sorted(int(s) for s in (tmp_path / "run" / "out.jsonl.dropped").read_text().split())
    assert dropped, "the pipeline dropped some valid readings"
    assert not outcome.ok
    v = outcome.results.variants[0]
    assert v.truth is not None
    classes = v.truth.classes
    # Its own idea of valid includes readings from the future (it never looks at the clock): one of those it
    # dropped is bad input left out, not lost. Every other one it dropped is lost.
    future_dropped = classes["future_timestamp"].not_persisted
    assert v.ledger.lost == len(dropped) - future_dropped > 0
    assert classes["valid"].lost + classes["offset_timestamp"].lost == v.ledger.lost
    assert set(v.ledger.missing_seq_sample or []) <= set(dropped)
    assert v.ledger.not_persisted_expected, "the bad input it left out is still set aside"
    assert any(f"{v.ledger.lost} message(s) lost" in p for p in outcome.problems())


def test_kept_rejects_are_compared_with_the_truth(tmp_path: Path, write_scenario: Callable[[str], Path]) -> None:
    outcome = _run(write_scenario, tmp_path, extra=", --refuse-valid, '5'", rejects=True)
    assert outcome.ok, outcome.problems()
    v = outcome.results.variants[0]
    lg, truth = v.ledger, v.truth
    assert truth is not None and truth.rejects_kept
    classes = truth.classes
    # Refused with its seq and its own reason; malformed JSON has no seq to keep, so it is found nowhere.
    assert classes["nan"].reasons is None and classes["nan"].not_persisted == classes["nan"].sent
    assert classes["missing_field"].rejected == classes["missing_field"].sent > 0
    assert set(classes["missing_field"].reasons or {}) <= {"missing_field", "bad_value"}
    assert classes["malformed_json"].not_persisted == classes["malformed_json"].sent
    # Good input it refused: a finding with its count, in the rejects beside the bad.
    valid = classes["valid"]
    assert valid.rejected > 0 and valid.reasons == {"policy": valid.rejected} and valid.lost == 0
    assert truth.refused_good_input["valid"] == valid.rejected
    # Each reject is one message's, counted once: the ledger's by seq, the truth table's by label.
    assert lg.rejected == sum(c.rejected for c in classes.values()) and lg.lost == 0
    assert lg.by_reason == dict(sum((Counter(c.reasons or {}) for c in classes.values()), Counter()))
    rows = _summary(outcome)
    assert rows["refused good input"].startswith(
        f"{sum(truth.refused_good_input.values()):,} (valid {valid.rejected:,}"
    )
    assert any(f.startswith(f"{valid.rejected:,} refused though the truth label says store") for f in truth.findings)


# ----------------------------------------------------------------------------- the rules, without a run


def test_the_default_labels_are_the_ones_the_builtin_validator_rejects_by_default() -> None:
    stored = {"valid", "offset_timestamp", "epoch_seconds", "epoch_millis", "out_of_order", "extra_fields"}
    assert not stored & EXPECTED_NOT_PERSISTED
    assert {"nan", "inf", "malformed_json", "invalid_utf8", "future_timestamp", "duplicate"} <= EXPECTED_NOT_PERSISTED
    # The scenario's list replaces the default; an anomaly's own expect: decides for its kind.
    assert expected_not_persisted(["nan", "late"], {"late": "accepted", "oversize": "rejected"}) == {"nan", "oversize"}
    assert "valid" not in expected_not_persisted(["valid"], None), "a clean reading is always to be stored"


def test_a_deliberate_copy_pairs_its_missing_send_with_the_copy() -> None:
    """A seq sent twice on purpose (the duplicate anomaly): stored once is what dedup does, not a loss; stored
    twice is bad input stored; stored never is one loss (the original) and one copy left out."""
    expected = frozenset({"duplicate"})
    sends = [(1, ["valid", "duplicate"]), (2, ["valid", "duplicate"]), (3, ["valid", "duplicate"])]
    tally = tally_external(sends, [1, 2, 2], [], {}, expected, rejects_kept=False)
    assert tally.classes["duplicate"] == Counter(sent=3, not_persisted=2, persisted=1)
    assert tally.classes["valid"] == Counter(sent=3, persisted=2, lost=1)
    assert tally.missing == [3]
    assert tally.accepted_bad_input == {"duplicate": 1}


def test_rejects_go_to_the_bad_send_first_and_their_reasons_are_kept() -> None:
    expected = frozenset({"nan"})
    sends = [(1, ["nan"]), (2, ["valid"]), (3, ["valid"])]
    tally = tally_external(
        sends, [3], [(1, "non_finite"), (2, "policy"), (None, "invalid_json")], {}, expected, rejects_kept=True
    )
    assert tally.classes["nan"] == Counter(sent=1, rejected=1)
    assert tally.reasons["nan"] == Counter(non_finite=1)
    assert tally.refused_good_input == {"valid": 1} and tally.reasons["valid"] == Counter(policy=1)
    assert tally.missing == []


def test_an_unknown_kind_in_expect_rejected_is_refused_naming_the_field(
    write_scenario: Callable[[str], Path],
) -> None:
    text = (
        SCENARIO.replace("PIPELINE", "x.py")
        .replace(" EXTRA", "")
        .replace("REJECTS", "    expect_rejected: [nan, bogus]")
    )
    with pytest.raises(ScenarioError, match=r"system\.external\.expect_rejected\[1\]: .*\(got 'bogus'\)"):
        load_scenario(write_scenario(text))


def test_bench_load_judges_by_truth_label_as_bench_run_does(
    tmp_path: Path, write_scenario: Callable[[str], Path]
) -> None:
    """Under locust the users keep no copy of what they sent; the bench rebuilds the anomalous messages from the
    scenario, seed and epoch, so the same split holds: bad input left out is set aside, nothing is lost."""
    from bench.load.runner import LoadOptions, run_load

    text = SCENARIO.replace("PIPELINE", str(PIPELINE)).replace(" EXTRA", "").replace("REJECTS", "")
    outcome = run_load(load_scenario(write_scenario(text)), LoadOptions(out=tmp_path / "load", workers=1))
    assert outcome.ok, outcome.problems
    v = outcome.results.variants[0]
    lg = v.ledger
    assert lg.lost == 0 and lg.not_persisted_expected is not None and lg.not_persisted_expected > 0
    assert lg.sent == lg.persisted + lg.rejected + lg.dropped + lg.not_persisted_expected
    assert lg.not_persisted_by_truth is not None
    assert set(lg.not_persisted_by_truth) <= set(EXPECTED_NOT_PERSISTED) and "valid" not in lg.not_persisted_by_truth
    assert v.truth is not None and v.truth.classes["valid"].lost == 0
