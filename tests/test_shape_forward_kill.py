"""External store-and-forward pipelines through ``forward.external``, and kill -9 of their processes mid-run.

The built-in sender runs as its own process (``python -m pipeline.forward``, the very path a user's pipeline
takes); a small stub pipeline (tests/data/forward_stub_pipeline.py) stalls on purpose so a kill finds lines it
never read in the pipe. Assertions are on counts read back from the upstream, never on wall times."""

from __future__ import annotations

import json
from pathlib import Path

from bench.harness import runner
from bench.scenario import load_scenario

STUB = Path(__file__).parent / "data" / "forward_stub_pipeline.py"

BUILT_IN = """
name: fwdkill
seed: 5
machines: {count: 4, id: "m-{i}"}
phases: [{kind: steady, rate: 100, duration: 4s}]
anomalies: [{kind: nan, rate: 0.05}]
forward:
  strategies: []
  timeout: 500ms
  external:
    - name: outbox-p
      command: ["{python}", "-m", "pipeline.forward", "--upstream", "{upstream_url}", "--db", "{dir}/outbox.sqlite",
                "--batch-size", "10", "--backoff-cap", "0.2", "--seed", "{seed}", "--drain", "20"]
      ready: {log: "pipeline.forward: ready"}
      stop_timeout: 60s
    - name: naive-p
      baseline: true
      command: ["{python}", "-m", "pipeline.forward", "--upstream", "{upstream_url}", "--db", "{dir}/outbox.sqlite",
                "--strategy", "naive", "--batch-size", "10", "--drain", "20"]
      ready: {log: "pipeline.forward: ready"}
      stop_timeout: 60s
  faults:
    - {kind: down, at: 1s, duration: 2s}
    - {kind: kill, at: 2s, restart_after: 500ms}
"""


def test_built_in_sender_process_killed_mid_outage_outbox_resumes_naive_loses(tmp_path: Path) -> None:
    path = tmp_path / "fwdkill.yaml"
    path.write_text(BUILT_IN)
    outcome = runner.run(load_scenario(path), runner.RunOptions(out=tmp_path / "run"))
    by_name = {v.name: v.forward for v in outcome.results.variants}
    outbox, naive = by_name["outbox-p"], by_name["naive-p"]
    assert outbox is not None and naive is not None
    assert outbox.external and outbox.in_outbox is None and outbox.retries is None
    # Both were really killed (-9) and started again, then exited on their own once drained (0).
    assert outbox.kills == 1 and outbox.exit_codes == [-9, 0] and naive.exit_codes == [-9, 0]
    # The kill hit an outbox holding the outage's backlog (it says so as it starts), and the restart resumed it.
    starts = (tmp_path / "run" / "outbox-p" / "system.log").read_text().splitlines()
    resumed = [int(line.split("(outbox, ")[1].split(" ")[0]) for line in starts if "ready" in line]
    assert len(resumed) == 2 and resumed[1] > 0
    # Readings due while it was dead were held by the bench and written after: not its loss, and not lost.
    assert (outbox.held_during_kill or 0) > 0
    assert (outbox.lost, outbox.duplicates, outbox.out_of_order, outbox.passed_bad) == (0, 0, 0, 0)
    assert outbox.delivered + outbox.filtered == outbox.sent and outbox.filtered > 0
    # naive deleted what it took during the outage (2 s at 100 msg/s, polled every 20 ms): lost, all named.
    assert naive.lost > 0 and naive.unexplained == 0 and sum(naive.lost_by_fault.values()) == naive.lost
    assert outcome.ok, outcome.problems()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [v["name"] for v in saved["variants"]] == ["outbox-p", "naive-p"]


STUB_SCENARIO = f"""
name: fwdstub
seed: 6
machines: {{count: 2, id: "m-{{i}}"}}
phases: [{{kind: steady, rate: 50, duration: 3s}}]
anomalies: [{{kind: nan, rate: 0.1}}]
forward:
  strategies: [outbox]
  external:
    - name: stub
      command: ["{{python}}", "{STUB}", "--upstream", "{{upstream_url}}", "--dir", "{{dir}}", "--stall-after", "10"]
      ready: {{log: "stub: ready"}}
    - name: broken
      command: ["{{python}}", "-c", "import sys; sys.exit(3)"]
      ready: {{log: "never printed", timeout: 20s}}
  faults:
    - {{kind: kill, at: 1.5s, restart_after: 300ms}}
"""


def test_lines_left_unread_in_the_pipe_are_written_again_and_a_broken_pipeline_is_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "fwdstub.yaml"
    path.write_text(STUB_SCENARIO)
    outcome = runner.run(load_scenario(path), runner.RunOptions(out=tmp_path / "run"))
    by_name = {v.name: v.forward for v in outcome.results.variants}
    stub = by_name["stub"]
    assert stub is not None
    # The stub stopped reading after 10 lines; at the kill the pipe still held what came after, which the
    # restarted stub got again: nothing lost, nothing twice (its keys), every NaN refused by its filter.
    assert stub.kills == 1 and (stub.resent_after_kill or 0) > 0
    assert (stub.lost, stub.duplicates, stub.passed_bad, stub.not_written) == (0, 0, 0, 0)
    assert stub.delivered + stub.filtered == stub.sent and stub.filtered > 0
    # The one that exits before it is ready: a named failure of its own, the others ran.
    assert set(outcome.failures) == {"broken"} and "exited with code 3" in outcome.failures["broken"]
    assert not outcome.ok and {"stub", "outbox"} <= set(outcome.ledgers)
