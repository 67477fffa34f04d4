"""External pipelines of the recompute shape: the built-in one through the external path reconciles and agrees with
the oracle; a wrong one is caught by the oracle; a command that is missing or exits early is a one-line error."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.cli import main as bench_main
from bench.errors import ScenarioError
from bench.harness import runner
from bench.harness.progress import Progress
from bench.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
WRONG = ROOT / "tests" / "data" / "recompute_wrong_pipeline.py"

BASE = """
name: recompute-external
seed: 5
machines: {count: 3, id: "m-{i}"}
phases: [{kind: steady, rate: 150, duration: 2s}]
anomalies: [{kind: out_of_order, rate: 0.1, by: 1s}]
recompute:
  gather_interval: 50ms
  poll_interval: 20ms
  drain_timeout: 60s
  readers: {users: 2, wait: 50ms}
  variants: []
  external:
"""

BUILTIN = """
    - name: builtin-ext
      command: >-
        {python} -m pipeline.recompute --db {dir}/series.sqlite --port {port} --gather-interval 0.05 --exit-at-eof
      ready: {http: /status, timeout: 60s}
"""

WRONG_SPEC = f"""
    - name: wrong
      command: ["{{python}}", "{WRONG}", "{{port}}"]
      ready: {{log: "ready", timeout: 60s}}
"""


def test_builtin_through_the_external_path_reconciles_and_a_wrong_pipeline_is_caught(
    write_scenario: Callable[[str], Path], tmp_path: Path
) -> None:
    loaded = load_scenario(write_scenario(BASE + BUILTIN + WRONG_SPEC))
    seen: list[Progress] = []
    outcome = runner.run(loaded, runner.RunOptions(out=tmp_path / "run"), on_progress=seen.append)
    good, wrong = outcome.results.variants
    assert (good.name, wrong.name) == ("builtin-ext", "wrong")
    assert outcome.errors["builtin-ext"] == [], outcome.errors["builtin-ext"]

    rc = good.recompute
    assert rc is not None and rc.external is not None and rc.recompute == "external"
    assert good.ledger.sent == 300 and good.ledger.persisted == 300 and good.ledger.lost == 0
    assert rc.oracle.equal and rc.oracle.points == 300 == rc.oracle.api_points
    # Staleness by seq_through: every reading covered, none before it was sent.
    assert rc.staleness_ms.count == 300 and rc.unreflected == 0 and rc.staleness_ms.below_zero is None
    assert rc.late_readings > 0
    assert rc.cost_curve == [] and rc.cost_slope_ms_per_1k is None  # not measurable from outside
    assert rc.external.exit_code == 0  # --exit-at-eof: it finished on its own once stdin closed
    assert rc.external.cpu_s > 0 and rc.external.cpu_s_per_1k is not None and rc.external.peak_rss_mb > 0
    assert rc.readers is not None and rc.readers.requests > 0 and rc.readers.failures == 0
    assert rc.final_version is not None and rc.final_version > 0
    # Progress reports from the external variants too, with what their seq_through covers as received.
    mine = [p for p in seen if p.variant == "builtin-ext"]
    assert mine and {p.phase for p in mine} == {"recompute (external)"} and mine[0].variants == 2
    assert all(0 <= p.received <= p.sent <= 300 for p in mine) and max(p.received for p in mine) > 0

    # The wrong pipeline drops late readings: the oracle (and the ledger) must say so.
    wr = wrong.recompute
    assert wr is not None and not wr.oracle.equal and wr.oracle.mismatches > 0
    assert wrong.ledger.lost == wr.late_readings > 0  # exactly the late readings are missing from its series
    assert any("differs from the oracle" in e for e in outcome.errors["wrong"])
    assert not outcome.ok


def test_names_must_be_unique_across_variants_and_external(write_scenario: Callable[..., Path]) -> None:
    text = BASE.replace("variants: []", "variants: [{name: wrong, recompute: full, coalesce: false}]") + WRONG_SPEC
    with pytest.raises(ScenarioError, match=r"names must be unique, got wrong more than once"):
        load_scenario(write_scenario(text, "dup.yaml"))
    with pytest.raises(ScenarioError, match="at least one variant"):
        load_scenario(write_scenario(BASE.replace("  external:\n", ""), "none.yaml"))


def test_a_missing_command_or_one_that_exits_before_ready_is_a_one_line_error(
    write_scenario: Callable[..., Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = BASE.replace("variants: []", "variants: [{name: n, recompute: full, coalesce: false}]") + (
        '\n    - {name: ghost, command: "no-such-recompute-pipeline {port}", ready: {http: /status}}\n'
    )
    assert bench_main(["run", str(write_scenario(missing, "missing.yaml")), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recompute.external[0].command: 'no-such-recompute-pipeline' not found" in err[0]
    # Refused before any variant ran: no built-in variant's folder was made.
    assert not (tmp_path / "a" / "n").exists()

    # Exiting before ready fails that variant in one line; the variants before it keep their results.
    early = BASE.replace("variants: []", "variants: [{name: n, recompute: full, coalesce: false}]") + (
        '\n    - {name: early, command: "{python} -c \\"import sys; sys.exit(3)\\"", ready: {http: /status}}\n'
    )
    outcome = runner.run(load_scenario(write_scenario(early, "early.yaml")), runner.RunOptions(out=tmp_path / "b"))
    assert not outcome.ok
    why = outcome.failures["early"]
    assert "recompute.external[0]: the pipeline exited with code 3 before it was ready" in why and "\n" not in why
    assert outcome.ledgers["n"].reconciled, "the built-in variant that ran first kept its result"
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [v["name"] for v in saved["variants"]] == ["n"] and saved["failures"][0]["variant"] == "early"


def test_scenario_shows_how_to_run_the_builtin_as_external() -> None:
    """The comment in the shipped scenario is a working setting: parsed as YAML, it validates."""
    import yaml

    text = (ROOT / "scenarios" / "recompute.yaml").read_text()
    block = [line[1:] for line in text.splitlines() if line.startswith("#   ")]
    start = next(i for i, line in enumerate(block) if line.strip() == "external:")
    snippet = yaml.safe_load("\n".join(block[start:]))
    from bench.shapes.recompute_settings import RecomputeSettings

    settings = RecomputeSettings.model_validate({"variants": [], **snippet})
    assert settings.external[0].name == "builtin-ext"
    assert json.dumps(settings.external[0].argv()).count("{port}") == 1
